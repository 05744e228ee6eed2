#!/usr/bin/env bash
# A fresh Debian root, as a new user's machine: debootstrap from this machine's own apt
# sources, a clone of this repository's HEAD in it, and a command run there under
# systemd-nspawn (default: the README's `make demo` and `make test`, then `make deb`, whose
# packages for that release are copied back to dist/ for the systemd test).
#
#   scripts/fresh-root.sh DIST [COMMAND...]       DIST: bookworm (Debian 12) or trixie (13)
#
# Only what reaching the package registries needs is copied in from this machine: its
# extra CA certificates, apt's Acquire settings, /etc/pip.conf. Nothing else: every
# program the demo and the tests call must come from what scripts/setup.sh installs.
# FRESH_ROOT_DIR (default /var/tmp/tpm-identity-fresh) holds the roots; each run starts
# from a new one. KEEP_ROOT=1 leaves it for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

dist=${1:?usage: scripts/fresh-root.sh bookworm|trixie [COMMAND...]}
shift
case "$dist" in bookworm|trixie) ;; *) echo "fresh-root: DIST must be bookworm or trixie" >&2; exit 2;; esac
if (($# == 0)); then set -- make demo test deb; fi
[ "$(id -u)" -eq 0 ] || { echo "fresh-root: run as root (debootstrap, systemd-nspawn)" >&2; exit 2; }
for tool in debootstrap systemd-nspawn git; do
    command -v "$tool" >/dev/null || { echo "fresh-root: $tool missing: run make setup" >&2; exit 2; }
done

base=${FRESH_ROOT_DIR:-/var/tmp/tpm-identity-fresh}
root=$base/$dist
mkdir -p "$base"
rm -rf --one-file-system "$root"

# This machine's mirrors, as its apt sources name them (deb822 or one-line format).
uris=$( { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs: *//p'
          grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              | awk '{print $2}'; } || true)
mirror=$(grep -v -- '-security' <<<"$uris" | head -n1)
security=$(grep -- '-security' <<<"$uris" | head -n1 || true)
[ -n "$mirror" ] || { echo "fresh-root: no Debian mirror in this machine's apt sources" >&2; exit 2; }

started=$SECONDS
echo "fresh-root: debootstrap $dist from $mirror"
debootstrap --variant=minbase --include=ca-certificates,git,make "$dist" "$root" "$mirror" \
    > "$base/$dist-debootstrap.log" 2>&1 || { tail -20 "$base/$dist-debootstrap.log"; exit 1; }

{
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' "$mirror" "$dist" "$dist"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [ -n "$security" ]; then
        printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$security" "$dist"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
} > "$root/etc/apt/sources.list.d/debian.sources"
rm -f "$root/etc/apt/sources.list"
for conf in /etc/apt/apt.conf.d/*; do
    grep -q '^Acquire::' "$conf" 2>/dev/null && cp "$conf" "$root/etc/apt/apt.conf.d/"
done
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"

git clone --quiet --no-hardlinks "$repo" "$root/work/project"
[ -d "$repo/../shared" ] && cp -r "$repo/../shared" "$root/work/shared"
echo "fresh-root: root ready in $((SECONDS - started)) s; running: $*"

status=0
systemd-nspawn --quiet --register=no --keep-unit --resolv-conf=copy-host \
    --directory="$root" --chdir=/work/project --setenv=CI="${CI:-}" \
    --setenv=DEBIAN_FRONTEND=noninteractive \
    /bin/sh -c 'update-ca-certificates >/dev/null && exec "$@"' sh "$@" || status=$?
echo "fresh-root: $dist: '$*' exited $status after $((SECONDS - started)) s"
if compgen -G "$root/work/project/dist/*.deb" >/dev/null; then
    mkdir -p "$repo/dist"
    cp "$root"/work/project/dist/*.deb "$repo/dist/"
    echo "fresh-root: $(cd "$root/work/project/dist" && echo *.deb) copied to dist/"
fi
[ -n "${KEEP_ROOT:-}" ] || rm -rf --one-file-system "$root"
exit "$status"
