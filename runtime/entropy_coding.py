"""rANS entropy coding of the DiffEIC latents (y: Gaussian conditional, z: EntropyBottleneck).

This is the only module that imports the C++ extension ``runtime._rans``. Two stream
formats are available:

* ``"compat"``: byte-identical to compressai's ``RansEncoder``/``BufferedRansEncoder``
  streams (the official DiffEIC bitstream), see ``shared/specs/rans-compressai-format.md``.
* ``"native"``: this project's faster, versioned format (16 interleaved 64-bit states,
  escapes in a separate raw bit section), see ``docs/rans-native-format.md``.

Every failure (bad tables, bad arrays, NaN scales, uncodable symbols, truncated or
corrupted streams, wrong element counts) raises :class:`ValueError` with a reason.
Values outside compressai's escape range are coded exactly in both formats: any int32
symbol round-trips (compressai itself hangs for |value| above about 2^27).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from runtime import _rans

__all__ = [
    "FORMATS",
    "BottleneckTables",
    "GaussianTables",
    "IndexDecoder",
    "YDecoder",
    "YEncoder",
    "decode_with_indexes",
    "decode_z",
    "encode_with_indexes",
    "encode_z",
    "gaussian_symbols",
]

logger = logging.getLogger(__name__)

FORMATS: tuple[str, str] = ("compat", "native")
_FORMAT_ID = {"compat": 0, "native": 1}
_HALF_ID = {"anchor": 0, "nonanchor": 1}

#: Lower bound applied to the scales before the index lookup (compressai's 0.11).
SCALE_BOUND = np.float32(0.11)


def _fmt(fmt: str) -> int:
    try:
        return _FORMAT_ID[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown rANS format {fmt!r}; expected one of {FORMATS}") from None


def _half(half: str) -> int:
    try:
        return _HALF_ID[half]
    except (KeyError, TypeError):
        raise ValueError(f"unknown checkerboard half {half!r}; expected 'anchor' or 'nonanchor'") from None


def _int32_array(a: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == np.int32:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} has values outside the int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _float32_array(a: Any, name: str, ndim: int | None = None) -> np.ndarray:
    arr = np.asarray(a)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def _as_map(a: Any, name: str) -> np.ndarray:
    """A (C,H,W) float32 map; a leading batch axis of size 1 is accepted and dropped."""
    arr = np.asarray(a)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    return _float32_array(arr, name, 3)


def _as_bytes(stream: Any) -> bytes:
    if isinstance(stream, bytes):
        return stream
    if isinstance(stream, (bytearray, memoryview)):
        return bytes(stream)
    raise ValueError(f"stream must be bytes, got {type(stream).__name__}")


class _CdfTables:
    """Common part of the two table kinds: validated CDF rows held by the C++ core."""

    _core: Any

    def __init__(self, quantized_cdf: Any, cdf_length: Any, offset: Any, scale_table: np.ndarray | None) -> None:
        cdf = _int32_array(quantized_cdf, "quantized_cdf", 2)
        lengths = _int32_array(cdf_length, "cdf_length", 1)
        offsets = _int32_array(offset, "offset", 1)
        if lengths.shape[0] != cdf.shape[0]:
            raise ValueError(f"cdf_length has {lengths.shape[0]} entries but quantized_cdf has {cdf.shape[0]} rows")
        if offsets.shape[0] != cdf.shape[0]:
            raise ValueError(f"offset has {offsets.shape[0]} entries but quantized_cdf has {cdf.shape[0]} rows")
        self.quantized_cdf = cdf
        self.cdf_length = lengths
        self.offset = offsets
        self._core = _rans.Tables(cdf, lengths, offsets, scale_table)

    @property
    def num_rows(self) -> int:
        """Number of CDF rows (valid indexes are 0 .. num_rows-1)."""
        return int(self.quantized_cdf.shape[0])


class GaussianTables(_CdfTables):
    """GaussianConditional tables: float32 scale table plus one 16-bit CDF row per scale.

    Validated once: CDF rows start at 0, are non-decreasing and end at 65536 at
    ``cdf_length - 1``; lengths fit the row width; the scale table is float32, finite,
    positive, strictly ascending and has one entry per row. Raises ValueError otherwise.
    """

    def __init__(self, scale_table: np.ndarray, quantized_cdf: np.ndarray, cdf_length: np.ndarray, offset: np.ndarray) -> None:
        st = np.asarray(scale_table)
        if st.ndim != 1:
            raise ValueError(f"scale_table must be 1-D, got shape {st.shape}")
        if st.dtype != np.float32:
            if st.dtype.kind != "f":
                raise ValueError(f"scale_table must be float32, got dtype {st.dtype}")
            st32 = st.astype(np.float32)
            if not np.array_equal(st32.astype(st.dtype), st):
                raise ValueError("scale_table must be float32 (values are not exactly representable)")
            st = st32
        st = np.ascontiguousarray(st)
        self.scale_table = st
        super().__init__(quantized_cdf, cdf_length, offset, st)

    @classmethod
    def from_npz(cls, data: Any, prefix: str = "gc_") -> "GaussianTables":
        """Build from a mapping with ``gc_scale_table``, ``gc_quantized_cdf``, ``gc_cdf_length``, ``gc_offset``."""
        return cls(data[prefix + "scale_table"], data[prefix + "quantized_cdf"], data[prefix + "cdf_length"], data[prefix + "offset"])

    def indexes(self, scales: np.ndarray) -> np.ndarray:
        """CDF indexes of float32 scales (numpy reference; the coders compute them in C++)."""
        s = np.maximum(_float32_array(scales, "scales"), SCALE_BOUND)
        if np.isnan(s).any():
            raise ValueError("NaN scale in the entropy parameters")
        return np.searchsorted(self.scale_table[:-1], s, side="left").astype(np.int32)


class BottleneckTables(_CdfTables):
    """EntropyBottleneck tables: per-channel float32 medians and one CDF row per channel."""

    def __init__(self, medians: np.ndarray, quantized_cdf: np.ndarray, cdf_length: np.ndarray, offset: np.ndarray) -> None:
        med = _float32_array(medians, "medians", 1)
        if not np.isfinite(med).all():
            raise ValueError("medians must be finite")
        super().__init__(quantized_cdf, cdf_length, offset, None)
        if med.shape[0] != self.num_rows:
            raise ValueError(f"medians has {med.shape[0]} entries but there are {self.num_rows} CDF rows")
        self.medians = med

    @classmethod
    def from_npz(cls, data: Any, prefix: str = "eb_") -> "BottleneckTables":
        """Build from a mapping with ``eb_medians``, ``eb_quantized_cdf``, ``eb_cdf_length``, ``eb_offset``."""
        return cls(data[prefix + "medians"], data[prefix + "quantized_cdf"], data[prefix + "cdf_length"], data[prefix + "offset"])


def _core(tables: Any) -> Any:
    if not isinstance(tables, _CdfTables):
        raise ValueError(f"tables must be GaussianTables or BottleneckTables, got {type(tables).__name__}")
    return tables._core


def _check_triplet(y: np.ndarray, scales: np.ndarray, means: np.ndarray) -> None:
    if not (y.shape == scales.shape == means.shape):
        raise ValueError(f"y, scales and means must have the same shape, got {y.shape}, {scales.shape}, {means.shape}")


class YEncoder:
    """One rANS stream for all y slices (``BufferedRansEncoder`` semantics).

    Call :meth:`encode_half` for every slice's anchor then non-anchor half, in stream
    order, then :meth:`finish` once. The symbols and indexes appended so far are
    available as :attr:`symbols` / :attr:`indexes` (int32, stream order).
    """

    def __init__(self, tables: GaussianTables, fmt: str = "compat") -> None:
        if not isinstance(tables, GaussianTables):
            raise ValueError("YEncoder needs GaussianTables")
        self.tables = tables
        self.fmt = fmt
        self._enc = _rans.YEncoder(tables._core, _fmt(fmt))
        self._stream: bytes | None = None

    def encode_half(self, y: np.ndarray, scales: np.ndarray, means: np.ndarray, half: str) -> np.ndarray:
        """Append the symbols of one checkerboard half of a slice; returns its y_hat.

        y, scales, means: float32 (C, H, W) full maps (a leading batch axis of 1 is
        accepted). Returns float32 (C, H, W): ``symbol + mean`` at the half's positions
        and 0 elsewhere.
        """
        if self._stream is not None:
            raise ValueError("encoder already finished")
        h = _half(half)
        y, scales, means = _as_map(y, "y"), _as_map(scales, "scales"), _as_map(means, "means")
        _check_triplet(y, scales, means)
        return self._enc.encode_half(y, scales, means, h)

    def finish(self) -> bytes:
        """Code everything appended into one stream (callable once)."""
        if self._stream is None:
            self._stream = self._enc.finish()
        return self._stream

    @property
    def symbols(self) -> np.ndarray:
        """int32 symbols appended so far, in stream order."""
        return self._enc.symbols()

    @property
    def indexes(self) -> np.ndarray:
        """int32 CDF indexes appended so far, in stream order."""
        return self._enc.indexes()

    def __len__(self) -> int:
        return int(self._enc.size)


class YDecoder:
    """Decodes a y stream half by half (``RansDecoder.set_stream`` + ``decode_stream``)."""

    def __init__(self, stream: bytes, tables: GaussianTables, fmt: str = "compat") -> None:
        if not isinstance(tables, GaussianTables):
            raise ValueError("YDecoder needs GaussianTables")
        self.tables = tables
        self.fmt = fmt
        self._dec = _rans.YDecoder(tables._core, _fmt(fmt), _as_bytes(stream))

    def decode_half(self, scales: np.ndarray, means: np.ndarray, half: str) -> np.ndarray:
        """Decode the next checkerboard half; returns y_hat as in :meth:`YEncoder.encode_half`."""
        h = _half(half)
        scales, means = _as_map(scales, "scales"), _as_map(means, "means")
        if scales.shape != means.shape:
            raise ValueError(f"scales and means must have the same shape, got {scales.shape}, {means.shape}")
        return self._dec.decode_half(scales, means, h)

    def finish(self) -> None:
        """Raise ValueError unless the stream was consumed exactly and the final state is valid."""
        self._dec.finish()


class IndexDecoder:
    """Incremental decode with explicit CDF indexes (the portable path computes the indexes
    of each half-slice from the symbols decoded before it)."""

    def __init__(self, stream: bytes, tables: GaussianTables | BottleneckTables, fmt: str = "compat") -> None:
        self._dec = _rans.Decoder(_core(tables), _fmt(fmt), _as_bytes(stream))

    def decode(self, indexes: np.ndarray) -> np.ndarray:
        """Decode ``len(indexes)`` int32 symbols, continuing the stream."""
        return self._dec.decode(_int32_array(indexes, "indexes", 1))

    def finish(self) -> None:
        """Raise ValueError unless the stream was consumed exactly and the final state is valid."""
        self._dec.finish()


def gaussian_symbols(y: np.ndarray, scales: np.ndarray, means: np.ndarray, half: str, tables: GaussianTables | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(symbols, indexes), int32, of one checkerboard half in stream order.

    ``tables`` gives the scale table; without it the paper/compressai 64-entry table
    ``exp(linspace(ln 0.11, ln 256, 64))`` (float32) is used.
    """
    t = tables if tables is not None else _default_gaussian_index_tables()
    h = _half(half)
    y, scales, means = _as_map(y, "y"), _as_map(scales, "scales"), _as_map(means, "means")
    _check_triplet(y, scales, means)
    return _rans.gaussian_symbols(t._core, y, scales, means, h)


_DEFAULT_INDEX_TABLES: GaussianTables | None = None


# float32 bit patterns of torch.exp(torch.linspace(log(0.11), log(256), 64)) as computed by the
# reference (compressai GaussianConditional scale table; identical for every DiffEIC model).
_SCALE_TABLE_BITS = (
    0x3DE147AE, 0x3DFEC793, 0x3E101230, 0x3E22EFC7, 0x3E3845C8, 0x3E506704, 0x3E6BB124, 0x3E85470A,
    0x3E96BACD, 0x3EAA779A, 0x3EC0CA0E, 0x3EDA08CA, 0x3EF695CC, 0x3F0B6FF2, 0x3F1DB234, 0x3F325889,
    0x3F49B318, 0x3F641C86, 0x3F80FDAB, 0x3F91E1BD, 0x3FA4FC07, 0x3FBA96AF, 0x3FD3058F, 0x3FEEA77C,
    0x4006F3DC, 0x40189FC7, 0x402C9C16, 0x4043365C, 0x405CC651, 0x4079AF2F, 0x408D3097, 0x409FAD98,
    0x40B4965B, 0x40CC3C0E, 0x40E6FA78, 0x41029CB1, 0x4113B71B, 0x41270EDD, 0x413CEF07, 0x4155AC83,
    0x4171A758, 0x4188A610, 0x419A8AD8, 0x41AEC774, 0x41C5AA71, 0x41DF8CA9, 0x41FCD28B, 0x420EF6DD,
    0x4221AF59, 0x4236DB65, 0x424ECD30, 0x4269E1A0, 0x428440F0, 0x42959263, 0x42A9285D, 0x42BF4EEC,
    0x42D85C06, 0x42F4B0DE, 0x430A5DBD, 0x431C7C18, 0x4330F9CE, 0x43482672, 0x43625BEB, 0x43800000,
)


def default_scale_table() -> np.ndarray:
    """compressai/DiffEIC scale table ``exp(linspace(ln 0.11, ln 256, 64))`` as the reference's
    float32 values (a numpy recomputation differs in the last bit for most entries)."""
    return np.array(_SCALE_TABLE_BITS, dtype=np.uint32).view(np.float32).copy()


def _default_gaussian_index_tables() -> GaussianTables:
    global _DEFAULT_INDEX_TABLES
    if _DEFAULT_INDEX_TABLES is None:
        st = default_scale_table()
        n = st.shape[0]
        cdf = np.zeros((n, 3), np.int32)
        cdf[:, 1] = 32768
        cdf[:, 2] = 65536
        _DEFAULT_INDEX_TABLES = GaussianTables(st, cdf, np.full(n, 3, np.int32), np.zeros(n, np.int32))
    return _DEFAULT_INDEX_TABLES


def encode_z(z: np.ndarray, tables: BottleneckTables, fmt: str = "compat") -> tuple[bytes, np.ndarray]:
    """EntropyBottleneck compress of one z map (C,H,W) float32 -> (stream, z_hat float32)."""
    if not isinstance(tables, BottleneckTables):
        raise ValueError("encode_z needs BottleneckTables")
    f = _fmt(fmt)
    zz = _as_map(z, "z")
    if zz.shape[0] != tables.num_rows:
        raise ValueError(f"z has {zz.shape[0]} channels but the tables have {tables.num_rows}")
    symbols, z_hat = _rans.bottleneck_symbols(zz, tables.medians)
    indexes = _channel_indexes(zz.shape)
    return _rans.encode_with_indexes(tables._core, f, symbols, indexes), z_hat


def decode_z(stream: bytes, tables: BottleneckTables, shape: tuple[int, int], fmt: str = "compat") -> np.ndarray:
    """EntropyBottleneck decompress: z_hat (C, H, W) float32 from a stream and the spatial size."""
    if not isinstance(tables, BottleneckTables):
        raise ValueError("decode_z needs BottleneckTables")
    f = _fmt(fmt)
    if len(shape) != 2 or any(int(s) < 0 for s in shape):
        raise ValueError(f"shape must be (H, W) with non-negative sizes, got {shape!r}")
    h, w = int(shape[0]), int(shape[1])
    c = tables.num_rows
    indexes = _channel_indexes((c, h, w))
    symbols = _rans.decode_with_indexes(tables._core, f, _as_bytes(stream), indexes)
    return (symbols.reshape(c, h, w).astype(np.float32) + tables.medians[:, None, None]).astype(np.float32)


def _channel_indexes(shape: tuple[int, ...]) -> np.ndarray:
    c, h, w = shape
    return np.repeat(np.arange(c, dtype=np.int32), h * w)


def encode_with_indexes(symbols: np.ndarray, indexes: np.ndarray, tables: GaussianTables | BottleneckTables, fmt: str = "compat") -> bytes:
    """Low level: code int32 symbols with per-symbol CDF row indexes into one stream."""
    core = _core(tables)
    f = _fmt(fmt)
    s = _int32_array(symbols, "symbols", 1)
    i = _int32_array(indexes, "indexes", 1)
    if s.shape != i.shape:
        raise ValueError(f"symbols and indexes must have the same length, got {s.shape[0]} and {i.shape[0]}")
    return _rans.encode_with_indexes(core, f, s, i)


def decode_with_indexes(stream: bytes, indexes: np.ndarray, tables: GaussianTables | BottleneckTables, fmt: str = "compat") -> np.ndarray:
    """Low level: decode ``len(indexes)`` int32 symbols; the stream must be consumed exactly."""
    core = _core(tables)
    f = _fmt(fmt)
    i = _int32_array(indexes, "indexes", 1)
    return _rans.decode_with_indexes(core, f, _as_bytes(stream), i)
