"""Count TPM commands from a capture made by the TSS pcap TCTI (``pcap:<child TCTI>``).

The TCTI writes each command and response as a TCP segment in a pcapng file
(``TCTI_PCAP_FILE``); commands are the segments sent to the TPM's side. Each TCTI
instance has an address pair of its own and stamps every segment with the wall
clock (microseconds), so :func:`round_trips` can time each command to its response
even when several processes append to one capture.
"""

from __future__ import annotations

import ctypes
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

COMMAND_NAMES = {
    0x131: "CreatePrimary", 0x13E: "SequenceComplete", 0x153: "Create", 0x154: "ECDH_ZGen",
    0x157: "Load", 0x15C: "SequenceUpdate", 0x15D: "Sign", 0x161: "ContextLoad",
    0x162: "ContextSave", 0x163: "ECDH_KeyGen", 0x165: "FlushContext", 0x167: "LoadExternal",
    0x173: "ReadPublic", 0x176: "StartAuthSession", 0x177: "VerifySignature",
    0x178: "ECC_Parameters", 0x17A: "GetCapability", 0x17B: "GetRandom", 0x17D: "Hash",
    0x186: "HashSequenceStart", 0x199: "EC_Ephemeral",
}
_ENHANCED_PACKET_BLOCK = 6
_TPM_TAGS = (0x8001, 0x8002)


@dataclass(frozen=True)
class _Packet:
    stamp_us: int  # the TCTI's CLOCK_REALTIME when it sent or received the segment
    source: int  # IPv4 addresses: random per TCTI instance, one pair per instance
    destination: int
    dst_port: int
    payload: bytes


def _packets(data: bytes) -> list[_Packet]:
    """Every packet in a pcapng capture of IPv4 frames."""
    out = []
    offset = 0
    while offset + 12 <= len(data):
        block_type, block_len = struct.unpack_from("<II", data, offset)
        if block_len < 12 or offset + block_len > len(data):
            break
        if block_type == _ENHANCED_PACKET_BLOCK:
            if struct.unpack_from("<I", data, offset + block_len - 4)[0] != block_len:
                raise ValueError(f"capture damaged at byte {offset}: writers interleaved?")
            high, low, captured = struct.unpack_from("<III", data, offset + 12)
            frame = data[offset + 28: offset + 28 + captured]
            ip_len = (frame[0] & 0x0F) * 4
            source, destination = struct.unpack_from(">II", frame, 12)
            dst_port = struct.unpack_from(">H", frame, ip_len + 2)[0]
            tcp_len = (frame[ip_len + 12] >> 4) * 4
            out.append(_Packet(high << 32 | low, source, destination, dst_port,
                               frame[ip_len + tcp_len:]))
        offset += block_len
    return out


def _segments(data: bytes) -> list[tuple[int, bytes]]:
    """(TCP destination port, payload) of every packet in a pcapng capture of IPv4 frames."""
    return [(packet.dst_port, packet.payload) for packet in _packets(data)]


@dataclass(frozen=True)
class RoundTrip:
    """One TPM command as its client saw it: sent at ``sent`` (wall clock, seconds), its
    response back ``seconds`` later (through whatever the child TCTI reaches: tpm2-abrmd,
    swtpm)."""

    name: str
    sent: float
    seconds: float


def round_trips(capture: Path) -> list[RoundTrip]:
    """Every answered command in ``capture``, each paired with the next response to the
    same TCTI instance; a command left without a response (the process ended) is dropped."""
    packets = [p for p in _packets(capture.read_bytes())
               if len(p.payload) >= 10 and struct.unpack_from(">H", p.payload)[0] in _TPM_TAGS]
    if not packets:
        return []
    tpm_port = packets[0].dst_port  # the first segment of a session is always a command
    pending: dict[tuple[int, int], _Packet] = {}
    out = []
    for packet in packets:
        if packet.dst_port == tpm_port:
            pending[packet.source, packet.destination] = packet
            continue
        command = pending.pop((packet.destination, packet.source), None)
        if command is not None:
            code = struct.unpack_from(">I", command.payload, 6)[0]
            out.append(RoundTrip(COMMAND_NAMES.get(code, hex(code)), command.stamp_us / 1e6,
                                 (packet.stamp_us - command.stamp_us) / 1e6))
    return out


def flush_capture() -> None:
    """Push the TCTI's buffered capture to disk; call it in the process that captures.

    The pcap TCTI writes through C stdio, which a worker ending with ``os._exit``
    (as multiprocessing's do) never flushes.
    """
    ctypes.CDLL(None).fflush(None)


def count_commands(capture: Path) -> Counter[str]:
    """TPM commands in ``capture`` by name (unknown codes as hex)."""
    counts: Counter[str] = Counter()
    segments = [(port, p) for port, p in _segments(capture.read_bytes())
                if len(p) >= 10 and struct.unpack_from(">H", p)[0] in _TPM_TAGS]
    if not segments:
        return counts
    tpm_port = segments[0][0]  # the first segment of a session is always a command
    for port, payload in segments:
        if port == tpm_port:
            code = struct.unpack_from(">I", payload, 6)[0]
            counts[COMMAND_NAMES.get(code, hex(code))] += 1
    return counts
