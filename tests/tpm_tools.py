"""tpm2-tools' view of TPM objects: the tests read attributes back from the TPM itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tpm2_pytss.tsskey import TSSPrivKey

from device_agent.tpm import SRK_HANDLE
from simulator.processes import SoftwareTPM, require


def readpublic(swtpm: SoftwareTPM, *args: str) -> str:
    result = subprocess.run(
        [require("tpm2_readpublic"), "-T", swtpm.tcti, *args],
        capture_output=True, text=True, env={**swtpm.env, "PATH": "/usr/bin:/bin"}, check=True,
    )
    return result.stdout


def field(readpublic_output: str, name: str) -> str:
    """The ``value:`` under a top-level key of tpm2_readpublic's YAML output."""
    lines = readpublic_output.splitlines()
    for i, line in enumerate(lines):
        if line == f"{name}:" and lines[i + 1].strip().startswith("value:"):
            return lines[i + 1].split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in:\n{readpublic_output}")


def attributes(readpublic_output: str) -> set[str]:
    return set(field(readpublic_output, "attributes").split("|"))


def load_and_read(swtpm: SoftwareTPM, key_file: Path, workdir: Path) -> str:
    """tpm2_load the blob of a TSS2 key file under the SRK, then tpm2_readpublic it."""
    tss = TSSPrivKey.from_pem(key_file.read_bytes())
    (workdir / "key.pub").write_bytes(tss.public.marshal())
    (workdir / "key.priv").write_bytes(tss.private.marshal())
    subprocess.run(
        [require("tpm2_load"), "-T", swtpm.tcti, "-C", hex(SRK_HANDLE),
         "-u", str(workdir / "key.pub"), "-r", str(workdir / "key.priv"),
         "-c", str(workdir / "key.ctx")],
        check=True, capture_output=True, env={**swtpm.env, "PATH": "/usr/bin:/bin"},
    )
    return readpublic(swtpm, "-c", str(workdir / "key.ctx"))
