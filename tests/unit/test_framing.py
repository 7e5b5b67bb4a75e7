"""Framing: what is written reads back, a cut leaves only whole records, flipped bits are caught."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from sf_lifecycle._framing import HEADER_SIZE, FrameStream, encode, scan

raw_payloads = st.lists(st.binary(max_size=60).filter(lambda b: b"\x00" not in b), max_size=10)


def build(items: list[bytes]) -> tuple[bytes, list[int]]:
    data = b""
    ends = []
    for p in items:
        data += encode(p)
        ends.append(len(data))
    return data, ends


@given(raw_payloads)
def test_any_sequence_reads_back_exactly(items: list[bytes]) -> None:
    data, _ = build(items)
    result = scan(data)
    assert [p for _, p in result.records] == items
    assert result.damage == []
    assert result.torn_at is None


@settings(max_examples=60)
@given(raw_payloads)
def test_truncation_at_every_offset_keeps_whole_records_only(items: list[bytes]) -> None:
    data, ends = build(items)
    for cut in range(len(data) + 1):
        result = scan(data[:cut])
        whole = [p for p, end in zip(items, ends, strict=True) if end <= cut]
        assert [p for _, p in result.records] == whole, cut
        assert result.damage == [], cut  # a cut is a torn tail, never corruption
        last_end = max([e for e in ends if e <= cut], default=0)
        assert result.torn_at == (None if cut == last_end else last_end), cut


@settings(max_examples=60)
@given(raw_payloads.filter(bool), st.data())
def test_flipped_bit_is_caught_and_other_records_survive(
    items: list[bytes], data: st.DataObject
) -> None:
    blob, ends = build(items)
    pos = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(blob)
    damaged[pos] ^= 1 << bit
    result = scan(bytes(damaged))
    starts = [0, *ends[:-1]]
    hit = next(i for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if s <= pos < e)
    # Never a wrong record: everything returned is an original record at its original offset.
    originals = dict(zip(starts, items, strict=True))
    assert all(originals.get(off) == p for off, p in result.records)
    # The damaged frame is not returned, and the damage is reported at its offset.
    assert starts[hit] not in {off for off, _ in result.records}
    assert result.damage
    assert result.damage[0].offset == starts[hit]
    # Every other record is still delivered (resynchronisation).
    assert {off for off, _ in result.records} == set(starts) - {starts[hit]}


def test_zero_filled_tail_is_torn_not_corrupt() -> None:
    data, _ = build([b'{"a":1}'])
    result = scan(data + b"\x00" * 100)
    assert [p for _, p in result.records] == [b'{"a":1}']
    assert result.torn_at == len(data)
    assert result.damage == []


def test_garbage_between_records_is_reported_and_skipped() -> None:
    a, b = encode(b'{"a":1}'), encode(b'{"b":2}')
    result = scan(a + b"garbage!" * 3 + b)
    assert [p for _, p in result.records] == [b'{"a":1}', b'{"b":2}']
    assert [(d.offset, d.length, d.reason) for d in result.damage] == [(len(a), 24, "bad magic")]


def test_oversized_length_with_valid_header_crc_is_corruption() -> None:
    import struct
    import zlib

    head = struct.pack("<2sBBII", b"SQ", 1, 0, 0xFFFFFFFF, 0)
    frame = head + struct.pack("<I", zlib.crc32(head))
    result = scan(frame + encode(b"{}"))
    assert result.damage[0].reason == "bad length"
    assert [p for _, p in result.records] == [b"{}"]
    assert HEADER_SIZE == 16


def _damaged(items: list[bytes], ops: list[tuple[int, int, int]]) -> bytes:
    """The frames of `items`, then each op: flip a bit, cut, zero a run, insert junk, zero fill."""
    data = bytearray(build(items)[0])
    for op, at, n in ops:
        i = at % (len(data) + 1)
        if op == 0 and data:
            data[i % len(data)] ^= 1 << (n % 8)
        elif op == 1:
            del data[i:]
        elif op == 2:
            data[i : i + n] = bytes(n)
        elif op == 3:
            data[i:i] = b"junk!" * (n % 4)
        else:
            data += bytes(n)
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(
    raw_payloads,
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2000), st.integers(1, 40)), max_size=3),
    st.integers(1, 70),
    st.integers(1, 4),
)
def test_reading_in_pieces_gives_exactly_the_whole_file_verdicts(
    items: list[bytes], ops: list[tuple[int, int, int]], chunk: int, per_call: int
) -> None:
    """Whatever the piece size (a frame, a header, even a magic cut between two reads), the
    stream finds the same records, damage and torn tail as a scan of the whole file."""
    data = _damaged(items, ops)
    whole = scan(data)
    stream = FrameStream(io.BytesIO(data).read, chunk)
    records = []
    while not stream.done:
        got = stream.frames(per_call)
        assert len(got) <= per_call
        records += got
    assert records == whole.records
    assert stream.damage == whole.damage
    assert stream.torn_at == whole.torn_at
    assert stream.size == len(data)
