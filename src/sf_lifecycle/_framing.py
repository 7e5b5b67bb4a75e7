"""Record framing of queue segment files: what a crash can cut, the reader can tell.

A segment is a plain concatenation of frames. One frame::

    offset  size  field
    0       2     magic b"SQ"
    2       1     format version (1)
    3       1     flags (0; a zero byte, which UTF-8 JSON can never contain)
    4       4     payload length, unsigned little-endian
    8       4     CRC-32 of the payload (zlib.crc32)
    12      4     CRC-32 of bytes 0..11 (so a damaged length is never trusted)
    16      n     payload: UTF-8 JSON

Deliberate choices:

- The header has its own checksum. Without it a flipped bit in the length would make the reader
  skip (or wait for) megabytes of good records; with it a bad header is "corrupt here" at once.
- A *torn tail* is a frame cut by a crash during its write: the bytes after the last good frame
  are a strict prefix of a frame (short header, or a good header whose payload runs past the end
  of the file), or only zero bytes (a file system that extended the file before writing it). Such
  a record was never acknowledged (acknowledgement waits for the fsync), so it is dropped with a
  log line and is not an error.
- Anything else is *corruption*: bad magic, bad header CRC, bad payload CRC, a payload that is
  not JSON. The reader reports the offset and reason, then resynchronises on the next position
  where a whole frame checks out, so the good records after the damage are still delivered.
  The zero flags byte cannot occur inside a JSON payload, and a false match would also need two
  matching CRC-32s, so resynchronisation does not invent records.
- zlib.crc32 rather than CRC-32C: it is in the standard library, runs in C at several GB/s, and
  detects every single-bit and burst error shorter than 32 bits, which is what disks produce.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "Damage",
    "ScanResult",
    "encode",
    "scan",
]

MAGIC = b"SQ"
VERSION = 1
_HEAD = struct.Struct("<2sBBII")  # magic, version, flags, length, payload crc
_HCRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HCRC.size  # 16
#: Largest payload a frame may carry; a length above it is corruption, not a long record.
MAX_PAYLOAD = 64 * 1024 * 1024
_PREFIX = MAGIC + bytes([VERSION, 0])


def encode(payload: bytes) -> bytes:
    """One frame around `payload` (already UTF-8 JSON)."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes is over the {MAX_PAYLOAD}-byte frame limit")
    head = _HEAD.pack(MAGIC, VERSION, 0, n, zlib.crc32(payload))
    return head + _HCRC.pack(zlib.crc32(head)) + payload


@dataclass(frozen=True, slots=True)
class Damage:
    """A region of a segment that is not a valid frame.

    Attributes:
        offset: Byte offset where the damage starts.
        length: Bytes skipped (up to the next good frame or the end of the file).
        reason: What failed: "bad magic", "bad header checksum", "bad payload checksum", ...
    """

    offset: int
    length: int
    reason: str


@dataclass(slots=True)
class ScanResult:
    """What a segment holds.

    Attributes:
        records: (offset, payload) of every good frame, in file order.
        damage: Corrupt regions (each skipped by resynchronisation). Empty for a healthy file.
        torn_at: Offset of a torn tail (an unacknowledged, cut-off last write), or None.
        size: Bytes scanned.
    """

    records: list[tuple[int, bytes]] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    torn_at: int | None = None
    size: int = 0

    @property
    def corrupt(self) -> bool:
        return bool(self.damage)


def _check_frame(data: bytes | memoryview, pos: int, end: int) -> tuple[str, int]:
    """Classify the frame at `pos`: ("ok", length) | ("torn", 0) | (reason, 0)."""
    if end - pos < HEADER_SIZE:
        return ("torn" if _is_prefix(data, pos, end) else "bad magic"), 0
    if data[pos : pos + 4] != _PREFIX:
        return ("bad magic" if data[pos : pos + 2] != MAGIC else "bad version or flags"), 0
    head = data[pos : pos + 12]
    (hcrc,) = _HCRC.unpack_from(data, pos + 12)
    if zlib.crc32(head) != hcrc:
        return "bad header checksum", 0
    _, _, _, n, pcrc = _HEAD.unpack_from(data, pos)
    if n > MAX_PAYLOAD:
        return "bad length", 0
    start = pos + HEADER_SIZE
    if start + n > end:
        return "torn", 0
    if zlib.crc32(data[start : start + n]) != pcrc:
        return "bad payload checksum", 0
    return "ok", n


def _is_prefix(data: bytes | memoryview, pos: int, end: int) -> bool:
    # Fewer than HEADER_SIZE bytes left: torn if they could start a frame.
    k = min(end - pos, len(_PREFIX))
    return bytes(data[pos : pos + k]) == _PREFIX[:k]


def _find_next(data: bytes, pos: int, end: int) -> int | None:
    """The next offset after `pos` where a whole, valid frame starts (None if there is none)."""
    i = pos + 1
    while True:
        i = data.find(_PREFIX, i, end)
        if i < 0:
            return None
        if _check_frame(data, i, end)[0] == "ok":
            return i
        i += 1


def scan(data: bytes, start: int = 0) -> ScanResult:
    """Split `data` (a whole segment, or its bytes from `start`) into frames.

    Never raises on bad input: damage is reported in the result (see the module docstring for
    torn tail versus corruption).
    """
    end = len(data)
    out = ScanResult(size=end)
    pos = start
    records = out.records
    while pos < end:
        verdict, n = _check_frame(data, pos, end)
        if verdict == "ok":
            body = pos + HEADER_SIZE
            records.append((pos, data[body : body + n]))
            pos = body + n
            continue
        if verdict == "torn" or not any(data[pos:end]):
            out.torn_at = pos
            break
        nxt = _find_next(data, pos, end)
        skip_to = end if nxt is None else nxt
        out.damage.append(Damage(pos, skip_to - pos, verdict))
        pos = skip_to
    return out
