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

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "Damage",
    "FrameStream",
    "ScanResult",
    "encode",
    "scan",
]

MAGIC = b"SQ"
VERSION = 1
_HEAD = struct.Struct("<2sBBII")  # magic, version, flags, length, payload crc
_HCRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HCRC.size  # 16
_WHOLE = struct.Struct("<4sIII")  # magic + version + flags, length, payload crc, header crc
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
    """Classify the frame at `pos`: ("ok", length) | ("torn", length or 0) | (reason, 0).

    A torn frame with a good header reports its payload length (how much more to read)."""
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
        return "torn", n
    if zlib.crc32(data[start : start + n]) != pcrc:
        return "bad payload checksum", 0
    return "ok", n


def _is_prefix(data: bytes | memoryview, pos: int, end: int) -> bool:
    # Fewer than HEADER_SIZE bytes left: torn if they could start a frame.
    k = min(end - pos, len(_PREFIX))
    return bytes(data[pos : pos + k]) == _PREFIX[:k]


def _zero(data: bytes, start: int, stop: int) -> bool:
    """True when `data[start:stop]` holds only zero bytes (or nothing)."""
    return data.count(0, start, stop) == max(0, stop - start)


#: Bytes read at a time by `FrameStream`: about 3,000 records of ~300 bytes.
CHUNK = 1 << 20


class FrameStream:
    """The frames of a file, read `chunk` bytes at a time: memory is one chunk plus one frame.

    The verdicts are those of a whole-file scan (the module docstring), decided with no more of
    the file in memory than the frame being checked: a frame cut by the end of a chunk is read
    on before it is judged, a torn tail is only called at the real end of the file, and
    resynchronisation after damage searches the file piece by piece (remembering only whether
    the bytes skipped were all zero, the other torn-tail case).

    Args:
        read: `read(n)` of the file, from its current position; b"" at the end.
        chunk: Bytes asked for at a time.
        base: File offset of the first byte `read` returns (offsets are reported from it).

    `damage`, `torn_at` and `size` are final once `done` is True.
    """

    __slots__ = (
        "_base",
        "_buf",
        "_chunk",
        "_eof",
        "_pos",
        "_read",
        "damage",
        "done",
        "size",
        "torn_at",
    )

    def __init__(self, read: Callable[[int], bytes], chunk: int = CHUNK, base: int = 0) -> None:
        if chunk < 1:
            raise ValueError("chunk must be positive")
        self._read, self._chunk = read, chunk
        self._buf = b""
        self._base = self.size = base
        self._pos = 0
        self._eof = False
        self.damage: list[Damage] = []
        self.torn_at: int | None = None
        self.done = False

    def _more(self, need: int = 0) -> bool:
        """Drop the bytes before `_pos`, append the next piece; False at the end of the file."""
        if self._eof:
            return False
        data = self._read(max(self._chunk, need))
        if not data:
            self._eof = True
            return False
        pos = self._pos
        self._base += pos
        self._buf = self._buf[pos:] + data if pos < len(self._buf) else data
        self._pos = 0
        self.size = self._base + len(self._buf)
        return True

    def frames(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` good frames as (offset, payload), in file order; [] once `done`."""
        out: list[tuple[int, bytes]] = []
        append = out.append
        crc32, unpack = zlib.crc32, _WHOLE.unpack_from
        while len(out) < limit and not self.done:
            buf, pos = self._buf, self._pos
            end = len(buf)
            if end - pos >= HEADER_SIZE:  # the common case, inlined: a whole, valid frame
                prefix, n, pcrc, hcrc = unpack(buf, pos)
                body = pos + HEADER_SIZE
                if (
                    prefix == _PREFIX
                    and body + n <= end
                    and n <= MAX_PAYLOAD
                    and crc32(buf[pos : pos + 12]) == hcrc
                ):
                    payload = buf[body : body + n]
                    if crc32(payload) == pcrc:
                        append((self._base + pos, payload))
                        self._pos = body + n
                        continue
            if end - pos < HEADER_SIZE and self._more():
                continue  # a header cut by the end of the piece: read on
            buf, pos, end = self._buf, self._pos, len(self._buf)
            if pos >= end:
                self.done = True
                break
            verdict, n = _check_frame(buf, pos, end)
            if verdict == "ok":
                body = pos + HEADER_SIZE
                append((self._base + pos, buf[body : body + n]))
                self._pos = body + n
                continue
            if verdict == "torn":
                if self._more(pos + HEADER_SIZE + n - end):
                    continue  # the frame runs past this piece, not (yet) past the file
                self.torn_at = self._base + pos
                self.done = True
                break
            self._resync(verdict)
        return out

    def _resync(self, reason: str) -> None:
        """Skip damage at `_pos` up to the next whole, valid frame, or the end of the file."""
        start = self._base + self._pos
        zero = True  # every byte skipped so far is zero (a zero tail is torn, not damage)
        i = self._pos + 1
        while True:
            buf = self._buf
            end = len(buf)
            j = buf.find(_PREFIX, i, end)
            if j >= 0:
                verdict, n = _check_frame(buf, j, end)
                if verdict == "ok":
                    self.damage.append(Damage(start, self._base + j - start, reason))
                    self._pos = j
                    return
                if verdict == "torn" and not self._eof:
                    zero = zero and _zero(buf, self._pos, j)
                    self._pos = j
                    if self._more(j + HEADER_SIZE + n - end):
                        i = 0  # the candidate, now at 0: check it again with more of the file
                        continue
                    # The end of the file (nothing was read, nothing moved): not a frame.
                i = j + 1
                continue
            # No candidate here: keep the last bytes, which may begin one across the boundary.
            cut = min(end, max(i, end - len(_PREFIX) + 1))
            zero = zero and _zero(buf, self._pos, cut)
            self._pos = cut
            if not self._more():
                zero = zero and _zero(self._buf, self._pos, len(self._buf))
                if zero:
                    self.torn_at = start
                else:
                    self.damage.append(Damage(start, self.size - start, reason))
                self._pos = len(self._buf)
                self.done = True
                return
            i = 0


def scan(data: bytes, start: int = 0) -> ScanResult:
    """Split `data` (a whole segment, or its bytes from `start`) into frames.

    Never raises on bad input: damage is reported in the result (see the module docstring for
    torn tail versus corruption). The same scanner as `FrameStream`, over bytes in memory.
    """
    stream = FrameStream(io.BytesIO(memoryview(data)[start:]).read, max(len(data), 1), start)
    out = ScanResult(size=len(data))
    while not stream.done:
        out.records += stream.frames(1 << 30)
    out.damage, out.torn_at = stream.damage, stream.torn_at
    return out
