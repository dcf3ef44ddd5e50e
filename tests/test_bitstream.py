"""Container format: round trips, the official layout, and every kind of damage."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import bitstream
from runtime.bitstream import BitstreamError, Stream


def _stream(**kw: object) -> Stream:
    base = dict(y=b"\x01\x02\x03\x04" * 5, z=b"\xaa" * 8, padded_hw=(128, 192), original_hw=(120, 180),
                coder_format="native", sampler="ddim", steps=4, seed=2**63 + 5, fingerprint=bytes(range(16)))
    base.update(kw)
    return Stream(**base)  # type: ignore[arg-type]


def test_native_round_trip() -> None:
    s = _stream()
    data = bitstream.pack(s)
    assert data[:4] == b"DEIC" and len(data) == bitstream.HEADER_SIZE + 20 + 8 + 4
    assert bitstream.unpack(data) == s


def test_reference_layout_matches_fixture(fixture_dir: Path) -> None:
    for case in (fixture_dir, fixture_dir / "pad"):
        raw = (case / "stream.bin").read_bytes()
        s = bitstream.unpack(raw)
        assert s.container == "reference" and s.padded_hw == (128, 192) and s.original_hw is None
        assert len(s.y) == struct.unpack(">I", raw[12:16])[0]
        assert bitstream.pack(s) == raw  # write_body layout reproduced byte for byte


@pytest.mark.parametrize("cut", [0, 1, 10, bitstream.HEADER_SIZE, -1, -5])
def test_truncated_native_rejected(cut: int) -> None:
    data = bitstream.pack(_stream())
    with pytest.raises(BitstreamError):
        bitstream.unpack(data[:cut])


def test_every_single_bit_flip_is_detected() -> None:
    data = bytearray(bitstream.pack(_stream()))
    for i in range(len(data)):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            try:
                s = bitstream.unpack(bytes(flipped))
            except BitstreamError:
                continue
            pytest.fail(f"flip of byte {i} bit {bit} went unnoticed: {s}")


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(BitstreamError, match="trailing"):
        bitstream.unpack(bitstream.pack(_stream()) + b"\0")


def test_unknown_version_rejected() -> None:
    data = bytearray(bitstream.pack(_stream()))
    data[4] = 9
    with pytest.raises(BitstreamError, match="version 9"):
        bitstream.unpack(bytes(data))


def test_foreign_files_rejected(fixture_dir: Path) -> None:
    with pytest.raises(BitstreamError, match="not a DiffEIC stream"):
        bitstream.unpack((fixture_dir / "input.png").read_bytes())
    with pytest.raises(BitstreamError, match="empty"):
        bitstream.unpack(b"")


def test_invalid_sizes_rejected() -> None:
    with pytest.raises(BitstreamError):
        bitstream.pack(_stream(padded_hw=(100, 192)))
    with pytest.raises(BitstreamError):
        bitstream.pack(_stream(original_hw=(50, 180)))  # 128 - 50 >= 64: not the padding of 50
    with pytest.raises(ValueError, match="sampler"):
        bitstream.pack(_stream(sampler="euler"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        bitstream.unpack(data)
    except BitstreamError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 2**64 - 1), st.integers(1, 65535))
def test_native_round_trip_property(y: bytes, seed: int, steps: int) -> None:
    s = _stream(y=y, seed=seed, steps=steps)
    assert bitstream.unpack(bitstream.pack(s)) == s
