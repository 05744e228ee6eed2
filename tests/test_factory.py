"""device-provision on real swtpm: the bootstrap identity, idempotency, refusals, batches."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import grp
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from device_agent import attest
from device_agent.config import AgentConfig
from device_agent.csr_attestation import TpmCertifyStatement
from device_agent.tpm import TPM, KeyBlob
from provisioning import pki
from provisioning.attestation import parse_public
from provisioning.factory import FactoryError, LineSettings, LocalFactoryCA
from provisioning.factory import provision as provision_in_process
from provisioning.registry import open_registry, registrar
from simulator.manufacturer import Manufacturer
from simulator.processes import SoftwareTPM, require

from .tpm_tools import attributes, load_and_read, readpublic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A factory line: its own PKI and registry."""
    base = tmp_path_factory.mktemp("line")
    paths = pki.init_pki(base / "pki")
    return {"pki": paths.base, "registry": base / "registry.sqlite3"}


def provision(line: dict[str, Path], *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provisioning.factory_cli", "--pki", str(line["pki"]),
         "--registry", str(line["registry"]), "--est-url", "https://est.example:8443",
         "--broker", "broker.example:8883", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "TSS2_LOG": "all+none", **(env or {})},
    )


def listing(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_bootstrap_key_is_tpm_generated_and_not_duplicable(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    result = provision(line, "--device-id", "fab-1", "--tcti", swtpm.tcti, "--out", str(out))
    assert result.returncode == 0, result.stderr
    shown = attributes(load_and_read(swtpm, out / "bootstrap.tss", tmp_path))
    assert {"fixedtpm", "fixedparent", "sensitivedataorigin"} <= shown
    assert "sign" in shown and "decrypt" not in shown


def test_bootstrap_certificate_verifies_against_the_factory_ca(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    assert provision(line, "--device-id", "fab-2", "--tcti", swtpm.tcti,
                     "--out", str(out)).returncode == 0
    verify = subprocess.run(
        [require("openssl"), "verify", "-CAfile",
         str(pki.PKIPaths(line["pki"]).factory_ca / "ca.pem"), str(out / "bootstrap.pem")],
        capture_output=True, text=True, check=False)
    assert verify.returncode == 0 and verify.stdout.strip().endswith(": OK")


def test_written_agent_config_is_accepted_by_the_agent(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    assert provision(line, "--device-id", "fab-3", "--tcti", swtpm.tcti,
                     "--out", str(out)).returncode == 0
    config = AgentConfig.load(out / "agent.toml")
    assert config.device.id == "fab-3" and config.device.tcti == swtpm.tcti
    assert config.est.url == "https://est.example:8443" and config.est.recovery_url is None
    assert config.paths.bootstrap_key == out / "bootstrap.tss"
    assert (out / "trust.pem").read_bytes() == \
        pki.PKIPaths(line["pki"]).server_trust.read_bytes()
    assert (out / "bootstrap.tss").stat().st_mode & 0o777 == 0o640


def test_the_recovery_listener_is_written_for_the_agent(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    result = provision(line, "--device-id", "fab-rec", "--tcti", swtpm.tcti, "--out", str(out),
                       "--recovery-url", "https://est.example:8444",
                       "--api-socket", str(tmp_path / "api.sock"))
    assert result.returncode == 0, result.stderr
    config = AgentConfig.load(out / "agent.toml")
    assert config.est.url == "https://est.example:8443"
    assert config.est.recovery_url == "https://est.example:8444"
    assert config.api.socket == tmp_path / "api.sock"


def test_a_bad_recovery_url_is_refused_before_anything_is_written(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    """The agent would refuse it in its agent.toml: the factory refuses it first."""
    for number, url in enumerate(("http://est.example:8444", "est.example:8444", "https://")):
        out = tmp_path / f"single-{number}"
        result = provision(line, "--device-id", f"fab-badrec-{number}", "--tcti", swtpm.tcti,
                           "--out", str(out), "--recovery-url", url)
        assert result.returncode == 2, (url, result.stdout)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "[est] recovery_url" in result.stderr, result.stderr
        assert not out.exists(), url
    with open(tmp_path / "line.csv", "w", newline="") as sheet:
        csv.writer(sheet).writerows([["fab-badrec-b1", swtpm.tcti, tmp_path / "batch-1"],
                                     ["fab-badrec-b2", swtpm.tcti, tmp_path / "batch-2",
                                      "https://est.example:8444"]])
    result = provision(line, "--batch", str(tmp_path / "line.csv"),
                       "--recovery-url", "http://est.example:8444")
    assert result.returncode == 2 and result.stdout == ""  # refused as a whole, no row tried
    assert "[est] recovery_url" in result.stderr, result.stderr
    assert not (tmp_path / "batch-1").exists() and not (tmp_path / "batch-2").exists()
    with open_registry(line["registry"]) as registry:
        assert [registry.device(f"fab-badrec-{n}") for n in ("0", "1", "2", "b1", "b2")] == \
            [None] * 5


def test_the_identity_is_handed_to_the_agents_group_with_narrow_modes(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    """The shipped unit runs as device-agent: it must read what the factory wrote, no more."""
    out = tmp_path / "etc"
    result = provision(line, "--device-id", "fab-grp", "--tcti", swtpm.tcti, "--out", str(out),
                       "--group", "nogroup")
    assert result.returncode == 0, result.stderr
    gid = grp.getgrnam("nogroup").gr_gid
    modes = {p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid)
             for p in (out, *out.iterdir())}
    assert modes == {"etc": (0o750, gid), "bootstrap.tss": (0o640, gid),
                     "agent.toml": (0o640, gid), "bootstrap.pem": (0o644, gid),
                     "trust.pem": (0o644, gid), "identity.json": (0o644, gid)}


def test_an_unknown_group_is_refused_and_nothing_is_written(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    result = provision(line, "--device-id", "fab-nogrp", "--tcti", swtpm.tcti, "--out", str(out),
                       "--group", "no-such-group")
    assert result.returncode == 2 and "no-such-group" in result.stderr
    assert listing(tmp_path) == []
    with open_registry(line["registry"]) as registry:
        assert registry.device("fab-nogrp") is None


def test_summary_names_the_device_and_the_registry_allowlists_it(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    result = provision(line, "--device-id", "fab-4", "--tcti", swtpm.tcti,
                       "--out", str(tmp_path / "etc"))
    summary = json.loads(result.stdout)
    assert summary["device_id"] == "fab-4"
    assert "BEGIN PUBLIC KEY" in summary["public_key_pem"]
    with open_registry(line["registry"]) as registry:
        device = registry.device("fab-4")
    assert device is not None and device.bootstrap_fingerprint == \
        summary["bootstrap_fingerprint_sha256"]


def test_running_again_changes_nothing_and_prints_the_same_summary(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    first = provision(line, "--device-id", "fab-5", "--tcti", swtpm.tcti, "--out", str(out))
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    second = provision(line, "--device-id", "fab-5", "--tcti", swtpm.tcti, "--out", str(out))
    assert second.returncode == 0
    assert second.stdout == first.stdout
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_force_reprovisions_and_revokes_the_old_bootstrap_certificate(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    first = json.loads(provision(line, "--device-id", "fab-6", "--tcti", swtpm.tcti,
                                 "--out", str(out)).stdout)
    forced = provision(line, "--device-id", "fab-6", "--tcti", swtpm.tcti, "--out", str(out),
                       "--force")
    assert forced.returncode == 0, forced.stderr
    second = json.loads(forced.stdout)
    assert second["bootstrap_serial"] != first["bootstrap_serial"]
    assert second["public_key_pem"] != first["public_key_pem"]
    with open_registry(line["registry"]) as registry:
        records = {c.serial: c for c in registry.certificates("fab-6")}
    assert records[first["bootstrap_serial"]].revoked
    assert not records[second["bootstrap_serial"]].revoked


@pytest.fixture
def locked_line(tmp_path: Path) -> dict[str, Path]:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("line secret\n")
    paths = pki.init_pki(tmp_path / "pki", passphrase=b"line secret")
    return {"pki": paths.base, "registry": tmp_path / "registry.sqlite3"}


def test_refusals_leave_no_partial_files(
    line: dict[str, Path], locked_line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    cases = {
        "malformed device ID": (line, ["--device-id", "bad/id", "--tcti", swtpm.tcti]),
        "TPM unreachable": (line, ["--device-id", "fab-x1",
                                   "--tcti", "swtpm:host=127.0.0.1,port=9"]),
        "Factory CA key locked": (locked_line, ["--device-id", "fab-x2", "--tcti", swtpm.tcti]),
    }
    missing = tmp_path / "missing-key-pki"
    pki.init_pki(missing)
    (missing / "factory-ca" / "ca.key").unlink()
    cases["Factory CA key missing"] = ({"pki": missing, "registry": line["registry"]},
                                       ["--device-id", "fab-x3", "--tcti", swtpm.tcti])
    expected = {"malformed device ID": "malformed device ID", "TPM unreachable": "no TPM",
                "Factory CA key locked": "Factory CA key", "Factory CA key missing":
                "Factory CA key missing"}
    for name, (which, args) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        before = listing(tmp_path)
        result = provision(which, *args, "--out", str(out))
        assert result.returncode != 0, name
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
        assert expected[name] in result.stderr, (name, result.stderr)
        assert listing(tmp_path) == before, name


def test_output_directory_of_another_device_is_refused_and_kept(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    assert provision(line, "--device-id", "fab-7", "--tcti", swtpm.tcti,
                     "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = provision(line, "--device-id", "fab-8", "--tcti", swtpm.tcti, "--out", str(out))
    assert result.returncode != 0
    assert "holds the identity of fab-7" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path).count("etc") == 1


@pytest.fixture
def line_of_tpms(tmp_path: Path) -> Iterator[list[SoftwareTPM]]:
    tpms = [SoftwareTPM(tmp_path / f"tpm-{i}", None, f"line{i}") for i in range(20)]
    started: list[SoftwareTPM] = []
    try:
        for tpm in tpms:
            tpm.__enter__()
            started.append(tpm)
        yield tpms
    finally:
        for tpm in started:
            tpm.stop()


def test_batch_of_twenty_carries_on_past_a_broken_tpm(
    line: dict[str, Path], line_of_tpms: list[SoftwareTPM], tmp_path: Path,
) -> None:
    with open(tmp_path / "line.csv", "w", newline="") as sheet:
        writer = csv.writer(sheet)  # quotes TCTIs, which contain commas
        writer.writerow(["device_id", "tcti", "out_dir"])
        for i, tpm in enumerate(line_of_tpms):
            tcti = "swtpm:host=127.0.0.1,port=9" if i == 10 else tpm.tcti
            writer.writerow([f"batch-{i:02d}", tcti, tmp_path / f"dev-{i:02d}"])
    result = provision(line, "--batch", str(tmp_path / "line.csv"))
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert result.returncode != 0
    assert lines[-1] == {"provisioned": 19, "failed": 1}
    failed = [x for x in lines[:-1] if not x["ok"]]
    assert [x["device_id"] for x in failed] == ["batch-10"]
    assert not (tmp_path / "dev-10").exists()
    assert all((tmp_path / f"dev-{i:02d}" / "agent.toml").exists() for i in range(20) if i != 10)


def test_a_batch_row_may_name_its_own_recovery_listener(
    line: dict[str, Path], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    """Fourth column: replaces --recovery-url for that row; empty or absent: the line's."""
    rows = {
        "rec-three": [],                                    # the 3-column sheet still works
        "rec-own": ["https://recovery-b.example:9444"],
        "rec-empty": [""],
        "rec-bad": ["http://recovery-b.example:9444"],      # refused, the line goes on
        "rec-five": ["https://recovery-b.example:9444", "extra"],
    }
    with open(tmp_path / "line.csv", "w", newline="") as sheet:
        writer = csv.writer(sheet)
        writer.writerow(["device_id", "tcti", "out_dir", "recovery_url"])
        for device_id, extra in rows.items():
            writer.writerow([device_id, swtpm.tcti, tmp_path / device_id, *extra])
    result = provision(line, "--batch", str(tmp_path / "line.csv"),
                       "--recovery-url", "https://recovery-a.example:8444")
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert result.returncode == 1
    assert lines[-1] == {"provisioned": 3, "failed": 2}
    assert [x.get("device_id") for x in lines[:-1] if not x["ok"]] == ["rec-bad", None]
    recovery = {device_id: AgentConfig.load(tmp_path / device_id / "agent.toml").est.recovery_url
                for device_id in ("rec-three", "rec-own", "rec-empty")}
    assert recovery == {"rec-three": "https://recovery-a.example:8444",
                        "rec-own": "https://recovery-b.example:9444",
                        "rec-empty": "https://recovery-a.example:8444"}
    assert not (tmp_path / "rec-bad").exists() and not (tmp_path / "rec-five").exists()
    with open_registry(line["registry"]) as registry:
        assert registry.device("rec-bad") is None and registry.device("rec-five") is None
        assert registry.device("rec-own") is not None


# --- key attestation: the TPM's maker and its attestation key ------------------------------

def pem_file(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(pki.cert_pem(c) for c in certificates))
    return path


def provision_attested(line: dict[str, Path], tpm: SoftwareTPM, manufacturer: Manufacturer,
                       tmp_path: Path, device_id: str, *extra: str,
                       ) -> subprocess.CompletedProcess[str]:
    """device-provision on a line that trusts ``manufacturer``, into ``tmp_path/etc``."""
    roots = pem_file(tmp_path / "roots.pem", manufacturer.root)
    chain = pem_file(tmp_path / "chain.pem", manufacturer.issuer)
    return provision(line, "--device-id", device_id, "--tcti", tpm.tcti,
                     "--out", str(tmp_path / "etc"), "--manufacturer-roots", str(roots),
                     "--manufacturer-intermediates", str(chain), *extra, env=tpm.env)


def test_a_tpm_of_a_trusted_maker_gets_an_attestation_key_proven_beside_its_ek(
    line: dict[str, Path], made_swtpm: SoftwareTPM, manufacturer: Manufacturer, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    result = provision_attested(line, made_swtpm, manufacturer, tmp_path, "fab-att")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"]["attestation.tss"] == str(out / "attestation.tss")
    assert stat.S_IMODE((out / "attestation.tss").stat().st_mode) == 0o640  # as bootstrap.tss
    assert AgentConfig.load(out / "agent.toml").paths.attestation_key == out / "attestation.tss"
    ak = attest.AttestationKeyBlob.read(out / "attestation.tss")
    with TPM(made_swtpm.tcti) as tpm:
        ek_certificate = x509.load_der_x509_certificate(attest.read_endorsement(tpm).certificate)
    with open_registry(line["registry"]) as registry:
        registered = registry.attestation_key("fab-att")
    assert registered is not None
    assert (registered.ak_public, registered.ek_cert_sha256) == \
        (ak.public_area, ek_certificate.fingerprint(hashes.SHA256()).hex())


def test_a_tpm_of_an_unknown_maker_is_refused_and_nothing_is_written(
    line: dict[str, Path], made_swtpm: SoftwareTPM, manufacturer: Manufacturer, tmp_path: Path,
) -> None:
    roots = pem_file(tmp_path / "roots.pem", manufacturer.root)
    stranger = Manufacturer(tmp_path / "maker-b", "maker-b")
    with SoftwareTPM(tmp_path / "tpm-b", None, "b", manufacturer=stranger) as other:
        before = listing(tmp_path)
        result = provision(line, "--device-id", "fab-stranger", "--tcti", other.tcti,
                           "--out", str(tmp_path / "etc"), "--manufacturer-roots", str(roots))
        after = listing(tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "does not chain to a trusted TPM manufacturer" in result.stderr
    assert after == before
    with open_registry(line["registry"]) as registry:
        assert registry.device("fab-stranger") is None
        assert registry.attestation_key("fab-stranger") is None


def test_a_tpm_without_ek_certificate_is_refused_when_the_line_attests(
    line: dict[str, Path], swtpm: SoftwareTPM, manufacturer: Manufacturer, tmp_path: Path,
) -> None:
    roots = pem_file(tmp_path / "roots.pem", manufacturer.root)
    result = provision(line, "--device-id", "fab-noek", "--tcti", swtpm.tcti,
                       "--out", str(tmp_path / "etc"), "--manufacturer-roots", str(roots))
    assert result.returncode == 2 and "no EK certificate" in result.stderr, result.stderr
    assert listing(tmp_path) == ["roots.pem"]


def test_the_ak_certifies_the_bootstrap_key_and_the_factory_ca_certifies_the_ak(
    line: dict[str, Path], made_swtpm: SoftwareTPM, manufacturer: Manufacturer, tmp_path: Path,
) -> None:
    out = tmp_path / "etc"
    result = provision_attested(line, made_swtpm, manufacturer, tmp_path, "fab-akcert",
                                "--group", "nogroup")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"]["attestation.pem"] == str(out / "attestation.pem")
    assert (stat.S_IMODE((out / "attestation.pem").stat().st_mode),
            (out / "attestation.pem").stat().st_gid) == (0o640, grp.getgrnam("nogroup").gr_gid)
    certificate = x509.load_pem_x509_certificate((out / "attestation.pem").read_bytes())
    boot = x509.load_pem_x509_certificate((out / "bootstrap.pem").read_bytes())
    certificate.verify_directly_issued_by(pki.load_certs(line["pki"] / "factory-ca" / "ca.pem")[0])

    # its own profile: the device's name, an AK certificate's usage and nothing a TLS peer takes
    extensions = certificate.extensions
    assert certificate.subject == boot.subject and certificate.serial_number != boot.serial_number
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [pki.TCG_KP_AIK_CERTIFICATE]
    usage = extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not (usage.key_cert_sign or usage.key_agreement
                                            or usage.key_encipherment or usage.content_commitment)
    assert not extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert abs(certificate.not_valid_after_utc - boot.not_valid_after_utc) < dt.timedelta(minutes=1)

    # its key is the AK the TPM holds (tpm2-tools' view) and the one registered for the device
    load_and_read(made_swtpm, out / "attestation.tss", tmp_path)
    readpublic(made_swtpm, "-c", str(tmp_path / "key.ctx"), "-f", "pem",
               "-o", str(tmp_path / "ak-public.pem"))
    in_tpm = serialization.load_pem_public_key((tmp_path / "ak-public.pem").read_bytes())
    assert certificate.public_key() == in_tpm
    with open_registry(line["registry"]) as registry:
        registered = registry.attestation_key("fab-akcert")
        records = registry.certificates("fab-akcert")
    assert registered is not None and registered.certificate == certificate
    assert parse_public(registered.ak_public).public_key == in_tpm
    # the bootstrap key's TPM2_Certify by that AK was verified before it was certified
    assert [(r.serial, r.attested) for r in records] == [(f"{boot.serial_number:x}", True)]


class WatchedFactoryCA(LocalFactoryCA):
    """The line's Factory CA, noting what it was asked to certify."""

    def __init__(self, paths: pki.PKIPaths) -> None:
        super().__init__(paths)
        self.asked: list[str] = []

    def sign(self, csr: x509.CertificateSigningRequest, device_id: str) -> x509.Certificate:
        self.asked.append("bootstrap key")
        return super().sign(csr, device_id)

    def certify_attestation_key(self, device_id: str,
                                public_key: CertificatePublicKeyTypes) -> x509.Certificate:
        self.asked.append("attestation key")
        return super().certify_attestation_key(device_id, public_key)


@pytest.mark.parametrize(("forgery", "reason"), [
    ("tampered", "attestation signature does not verify"),
    ("of another key", "attestation was made for another key"),
])
def test_a_bootstrap_key_the_ak_did_not_certify_is_refused_before_anything_is_issued(
    line: dict[str, Path], made_swtpm: SoftwareTPM, manufacturer: Manufacturer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, forgery: str, reason: str,
) -> None:
    """The real TPM's TPM2_Certify, spoilt on its way to the factory's check."""
    genuine = attest.certify

    def forged(tpm: TPM, ak: attest.AttestationKeyBlob, blob: KeyBlob) -> TpmCertifyStatement:
        if forgery == "of another key":
            return genuine(tpm, ak, tpm.create_key())
        statement = genuine(tpm, ak, blob)
        return dataclasses.replace(statement, attest=statement.attest[:-1]
                                   + bytes([statement.attest[-1] ^ 1]))

    monkeypatch.setattr(attest, "certify", forged)
    paths = pki.PKIPaths(line["pki"])
    settings = LineSettings(est_url="https://est.example:8443", broker_host="broker.example",
                            broker_port=8883, server_trust=paths.server_trust,
                            state_dir=tmp_path / "state", api_socket=None,
                            manufacturer_roots=(manufacturer.root,),
                            manufacturer_intermediates=(manufacturer.issuer,))
    factory_ca = WatchedFactoryCA(paths)
    device_id = "fab-forged-" + forgery.replace(" ", "-")
    before = listing(tmp_path)
    with pytest.raises(FactoryError, match=f"certification of the bootstrap key was refused: "
                                           f"{reason}"):
        provision_in_process(device_id, made_swtpm.tcti, tmp_path / "etc", factory_ca, settings,
                             registrar(line["registry"]))
    assert listing(tmp_path) == before and factory_ca.asked == []
    with open_registry(line["registry"]) as registry:
        assert registry.device(device_id) is None
        assert registry.attestation_key(device_id) is None
