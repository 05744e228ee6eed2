#!/usr/bin/env bash
# Idempotent set-up on Debian 12 or 13 as root: system packages, then a virtualenv
# with the project installed. Safe to run again; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# One list for set-up, the README and the tests: simulator/debian-packages.txt.
mapfile -t DEBS < <(sed -e 's/#.*//' simulator/debian-packages.txt | awk 'NF {print $1}')

missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian 12's Mosquitto (2.0.11) segfaults and loses acknowledged QoS 1 messages under the
# soak's churn (README, "The soak"); bookworm-backports carries 2.0.21, as Debian 13 does.
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ] \
        && ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' mosquitto)" ge 2.0.21; then
    [ "$(id -u)" -eq 0 ] || { echo "setup: Mosquitto >= 2.0.21 needed: run as root" >&2; exit 1; }
    mirror=$( { sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null
                grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                    | awk '{print $2}'; } | grep -v -- '-security' | head -n1 || true)
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n%s\n' \
        "${mirror:-http://deb.debian.org/debian}" \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        > /etc/apt/sources.list.d/bookworm-backports.sources
    echo "setup: Mosquitto 2.0.21 from bookworm-backports"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        mosquitto mosquitto-clients >/dev/null
fi
# The Debian mosquitto package enables a system service; our tests and demo start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    systemctl stop mosquitto || true
fi

PY=${PYTHON:-python3}
stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[server,broker,simulator,test]'
    touch "$stamp"
fi
# simulator/ and benchmarks/ are not in the wheel, so the editable install does not map
# them: the checkout itself goes on the venv's path, for fleet-sim from any directory.
purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$purelib/tpm-device-identity-checkout.pth"
