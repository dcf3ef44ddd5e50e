"""Bitstream containers: the project's versioned ``DEIC`` format and the official layout.

Native container, version 1 (all integers big-endian)::

    offset size  field
    0      4     magic b"DEIC"
    4      1     version (1)
    5      1     coder format: 0 = compat (compressai rANS), 1 = native (interleaved rANS)
    6      1     entropy path: 0 = reference (float context model), 1 = portable (integer)
    7      1     sampler: 0 = ddpm (spaced, fixed_small), 1 = ddim (eta 0), 2 = dpmpp (DPM-Solver++ 2M)
    8      2     sampling steps
    10     8     seed (uint64) of the initial noise and the DDPM per-step noise
    18     16    model fingerprint: first 16 bytes of the manifest's sha256 fingerprint
    34     4     original height (pixels)
    38     4     original width (pixels)
    42     4     padded height (multiple of 64)
    46     4     padded width (multiple of 64)
    50     4     length of the y string (bytes)
    54     4     length of the z string (bytes)
    58     -     y string, then z string
    end-4  4     CRC32 (zlib) of every preceding byte

The decoder refuses a stream whose magic, version, CRC, lengths, sizes or fingerprint do
not check out, naming the problem. The seed travels in the stream so one file decodes to
the same image on every run (the official code draws fresh noise per run).

Reference layout (``write_body`` of the official ``utils/utils.py``)::

    [Hz][Wz][2]  [len_y][y bytes]  [len_z][z bytes]      (big-endian uint32)

It carries no original size, sampler, seed or model identity: decoding one yields the
padded size unless the caller gives the crop.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"DEIC"
VERSION = 1
CODER_FORMATS = ("compat", "native")
ENTROPY_PATHS = ("reference", "portable")
SAMPLERS = ("ddpm", "ddim", "dpmpp")
MAX_SIDE = 1 << 15  # 32768 px: far beyond any latent-diffusion decode, small enough to reject garbage
_HEADER = struct.Struct(">4sBBBBHQ16sIIIIII")
HEADER_SIZE = _HEADER.size  # 58
FINGERPRINT_BYTES = 16


class BitstreamError(ValueError):
    """A stream is not a DiffEIC stream, is damaged, or does not fit these artifacts."""


@dataclass(frozen=True)
class Stream:
    """The decoded content of a stream file, whatever its container."""

    y: bytes
    z: bytes
    padded_hw: tuple[int, int]
    original_hw: tuple[int, int] | None = None
    coder_format: str = "compat"
    entropy_path: str = "reference"
    sampler: str | None = None
    steps: int | None = None
    seed: int | None = None
    fingerprint: bytes | None = None  # 16 bytes, or None for the reference layout
    container: str = "native"  # "native" (DEIC) or "reference"

    @property
    def z_hw(self) -> tuple[int, int]:
        return self.padded_hw[0] // 64, self.padded_hw[1] // 64


def _index(name: str, value: str, choices: tuple[str, ...]) -> int:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return choices.index(value)


def _check_sizes(padded: tuple[int, int], original: tuple[int, int] | None) -> None:
    ph, pw = padded
    if not (0 < ph <= MAX_SIDE and 0 < pw <= MAX_SIDE) or ph % 64 or pw % 64:
        raise BitstreamError(f"padded size {ph}x{pw} is invalid (must be positive multiples of 64, at most {MAX_SIDE})")
    if original is not None:
        oh, ow = original
        if not (0 < oh <= ph and 0 < ow <= pw) or ph - oh >= 64 or pw - ow >= 64:
            raise BitstreamError(f"original size {oh}x{ow} does not fit padded size {ph}x{pw}")


def pack(stream: Stream) -> bytes:
    """Serialise a stream in its container (``stream.container``)."""
    if stream.container == "reference":
        return pack_reference(stream.y, stream.z, stream.z_hw)
    if stream.original_hw is None or stream.sampler is None or stream.steps is None or stream.seed is None:
        raise ValueError("a native container needs original_hw, sampler, steps and seed")
    if stream.fingerprint is None or len(stream.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"a native container needs a {FINGERPRINT_BYTES}-byte model fingerprint")
    _check_sizes(stream.padded_hw, stream.original_hw)
    if not (0 < stream.steps < 1 << 16) or not (0 <= stream.seed < 1 << 64):
        raise ValueError(f"steps {stream.steps} or seed {stream.seed} out of range")
    header = _HEADER.pack(
        MAGIC, VERSION,
        _index("coder format", stream.coder_format, CODER_FORMATS),
        _index("entropy path", stream.entropy_path, ENTROPY_PATHS),
        _index("sampler", stream.sampler, SAMPLERS),
        stream.steps, stream.seed, stream.fingerprint,
        stream.original_hw[0], stream.original_hw[1], stream.padded_hw[0], stream.padded_hw[1],
        len(stream.y), len(stream.z),
    )
    body = header + stream.y + stream.z
    return body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def pack_reference(y: bytes, z: bytes, z_hw: tuple[int, int]) -> bytes:
    """The official ``write_body`` layout (z shape, 2 strings, length-prefixed y then z)."""
    return struct.pack(">III", z_hw[0], z_hw[1], 2) + struct.pack(">I", len(y)) + y + struct.pack(">I", len(z)) + z


def unpack(data: bytes) -> Stream:
    """Parse either container. Every field is validated before any payload is used."""
    if len(data) == 0:
        raise BitstreamError("empty stream")
    if data[:4] == MAGIC:
        return _unpack_native(data)
    return _unpack_reference(data)


def _unpack_native(data: bytes) -> Stream:
    if len(data) < HEADER_SIZE + 4:
        raise BitstreamError(f"truncated DEIC stream: {len(data)} bytes, the header alone needs {HEADER_SIZE + 4}")
    (magic, version, fmt, path, sampler, steps, seed, fp, oh, ow, ph, pw, ly, lz) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise BitstreamError(f"DEIC container version {version} is not supported (this runtime reads {VERSION})")
    expected = HEADER_SIZE + ly + lz + 4
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise BitstreamError(f"DEIC stream {what}: {len(data)} bytes, header announces {expected}")
    (crc,) = struct.unpack_from(">I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) & 0xFFFFFFFF != crc:
        raise BitstreamError("DEIC stream is corrupted: CRC32 mismatch")
    for name, value, choices in (("coder format", fmt, CODER_FORMATS), ("entropy path", path, ENTROPY_PATHS),
                                 ("sampler", sampler, SAMPLERS)):
        if value >= len(choices):
            raise BitstreamError(f"DEIC stream names unknown {name} code {value} (known: {list(choices)})")
    if steps == 0:
        raise BitstreamError("DEIC stream asks for 0 sampling steps")
    _check_sizes((ph, pw), (oh, ow))
    y = data[HEADER_SIZE:HEADER_SIZE + ly]
    z = data[HEADER_SIZE + ly:HEADER_SIZE + ly + lz]
    return Stream(
        y=y, z=z, padded_hw=(ph, pw), original_hw=(oh, ow), coder_format=CODER_FORMATS[fmt],
        entropy_path=ENTROPY_PATHS[path], sampler=SAMPLERS[sampler], steps=steps, seed=seed,
        fingerprint=fp, container="native",
    )


def _unpack_reference(data: bytes) -> Stream:
    if len(data) < 20:
        raise BitstreamError(f"not a DiffEIC stream: {len(data)} bytes, too short for either container")
    hz, wz, n = struct.unpack_from(">III", data, 0)
    if n != 2:
        raise BitstreamError(
            "not a DiffEIC stream: neither the DEIC magic nor the official layout "
            f"(string count {n}, expected 2)"
        )
    pos = 12
    strings = []
    for name in ("y", "z"):
        if pos + 4 > len(data):
            raise BitstreamError(f"truncated reference stream: no length for the {name} string")
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise BitstreamError(f"truncated reference stream: the {name} string needs {length} bytes, {len(data) - pos} left")
        strings.append(data[pos:pos + length])
        pos += length
    if pos != len(data):
        raise BitstreamError(f"reference stream has {len(data) - pos} trailing bytes")
    _check_sizes((hz * 64, wz * 64), None)
    return Stream(y=strings[0], z=strings[1], padded_hw=(hz * 64, wz * 64), container="reference")
