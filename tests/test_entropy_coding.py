"""Tests of the rANS entropy coder (runtime.entropy_coding / runtime._rans).

Byte identity with the official DiffEIC/compressai streams of the golden fixture,
property-based round trips of both formats (escapes and extreme int32 included), a
pure-Python reference of the compressai format, and error handling of bad input.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import entropy_coding as ec

FIXTURE = Path(os.environ.get("DIFFEIC_FIXTURE", Path(__file__).resolve().parents[2] / "shared/fixtures/diffeic-ref-tiny"))
SLICE_CH_TINY = [2, 2, 2, 2, 4, 4, 4, 4, 8, 8]
HALVES = ("anchor", "nonanchor")


# ------------------------------------------------------------------ helpers
def parse_stream_file(data: bytes) -> tuple[int, int, list[bytes]]:
    hz, wz, n = struct.unpack(">III", data[:12])
    pos, strings = 12, []
    for _ in range(n):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        pos += 4
        strings.append(data[pos : pos + length])
        pos += length
    assert pos == len(data)
    return hz, wz, strings


def reference_encode(symbols, indexes, cdfs, lengths, offsets) -> bytes:
    """compressai format written from the spec, in plain Python (slow; small inputs)."""
    ops: list[tuple] = []
    for s, i in zip(np.asarray(symbols).tolist(), np.asarray(indexes).tolist()):
        n, cdf = int(lengths[i]), cdfs[i]
        e, v = n - 2, s - int(offsets[i])
        if 0 <= v < e:
            ops.append(("s", int(cdf[v]), int(cdf[v + 1] - cdf[v])))
            continue
        ops.append(("s", int(cdf[e]), int(cdf[e + 1] - cdf[e])))
        raw = -2 * v - 1 if v < 0 else 2 * (v - e)
        m = 0
        while raw >> (4 * m):
            m += 1
        ops += [("b", 15)] * (m // 15) + [("b", m % 15)]
        ops += [("b", (raw >> (4 * j)) & 15) for j in range(m)]
    x, words = 1 << 31, []
    for op in reversed(ops):
        if op[0] == "s":
            _, b, f = op
            if x >= f << 47:
                words.append(x & 0xFFFFFFFF)
                x >>= 32
            x = ((x // f) << 16) + (x % f) + b
        else:
            if x >= 1 << 59:
                words.append(x & 0xFFFFFFFF)
                x >>= 32
            x = (x << 4) | op[1]
    return struct.pack("<Q", x) + b"".join(struct.pack("<I", w) for w in reversed(words))


def make_tables(rng: np.random.Generator, rows: int, max_symbols: int = 40, zero_freq: bool = False):
    """Random valid CDF rows (each symbol freq >= 1 unless zero_freq), offsets and lengths."""
    width = max_symbols + 1
    cdf = np.zeros((rows, width + 3), np.int32)  # extra zero padding
    lengths = np.zeros(rows, np.int32)
    for r in range(rows):
        k = int(rng.integers(1, max_symbols + 1))  # symbols incl. escape
        w = rng.random(k) ** 3 + 1e-3
        f = np.maximum(1, np.floor(w / w.sum() * (65536 - k))).astype(np.int64)
        f[-1] += 65536 - f.sum()
        if zero_freq and k > 2:
            j = int(rng.integers(0, k - 1))
            f[-1] += f[j]
            f[j] = 0
        cdf[r, 1 : k + 1] = np.cumsum(f)
        lengths[r] = k + 1
    offsets = rng.integers(-30, 5, rows).astype(np.int32)
    return cdf, lengths, offsets


def gaussian_like_tables(rows: int, rng: np.random.Generator):
    cdf, lengths, offsets = make_tables(rng, rows)
    scale = np.sort(rng.uniform(0.11, 50, rows).astype(np.float32))
    scale[0] = np.float32(0.11)
    scale = np.unique(scale)
    while scale.shape[0] < rows:  # pragma: no cover - vanishingly rare
        scale = np.unique(np.append(scale, scale[-1] * np.float32(1.5)))
    return ec.GaussianTables(scale, cdf, lengths, offsets)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fx() -> Path:
    if not (FIXTURE / "entropy_tables.npz").is_file():
        pytest.skip(f"golden fixture not found at {FIXTURE} (set DIFFEIC_FIXTURE)")
    return FIXTURE


@pytest.fixture(scope="module")
def tables(fx: Path):
    t = np.load(fx / "entropy_tables.npz")
    return ec.GaussianTables.from_npz(t), ec.BottleneckTables.from_npz(t), dict(t)


@pytest.fixture(scope="module", params=["main", "pad"])
def case(request, fx: Path):
    d = fx if request.param == "main" else fx / "pad"
    lf = dict(np.load(d / "lfgcm.npz"))
    hz, wz, (ys, zs) = parse_stream_file((d / "stream.bin").read_bytes())
    return {"name": request.param, "lf": lf, "y_string": ys, "z_string": zs, "zshape": (hz, wz)}


# ------------------------------------------------------- fixture byte identity
def test_encode_y_symbols_matches_official_stream(tables, case):
    gt, _, _ = tables
    lf = case["lf"]
    assert ec.encode_with_indexes(lf["y_symbols"], lf["y_indexes"], gt) == case["y_string"]


def test_reference_python_encoder_matches_official_stream(tables, case):
    _, _, raw = tables
    lf = case["lf"]
    got = reference_encode(lf["y_symbols"], lf["y_indexes"], raw["gc_quantized_cdf"], raw["gc_cdf_length"], raw["gc_offset"])
    assert got == case["y_string"]


def test_decode_official_y_and_z(tables, case):
    gt, bt, _ = tables
    lf = case["lf"]
    np.testing.assert_array_equal(ec.decode_with_indexes(case["y_string"], lf["y_indexes"], gt), lf["y_symbols"])
    z_hat = ec.decode_z(case["z_string"], bt, case["zshape"])
    np.testing.assert_array_equal(z_hat, lf["z_hat"][0])
    np.testing.assert_array_equal(np.rint(z_hat - bt.medians[:, None, None]).astype(np.int32), lf["z_symbols"][0])


def test_encode_z_matches_official(tables, case):
    _, bt, _ = tables
    lf = case["lf"]
    stream, z_hat = ec.encode_z(lf["z"][0], bt)
    assert stream == case["z_string"]
    np.testing.assert_array_equal(z_hat, lf["z_hat"][0])
    stream4, _ = ec.encode_z(lf["z"], bt)  # (1, C, H, W) accepted
    assert stream4 == stream


def _run_y_encoder(gt, lf, fmt):
    y = lf["y"][0]
    enc = ec.YEncoder(gt, fmt)
    y_hat = np.zeros_like(y)
    c0 = 0
    for i, c in enumerate(SLICE_CH_TINY):
        for half in HALVES:
            p = lf[f"params_{half}_{i}"][0]
            part = enc.encode_half(y[c0 : c0 + c], p[:c], p[c:], half)
            assert part.dtype == np.float32 and part.shape == (c,) + y.shape[1:]
            y_hat[c0 : c0 + c] += part
        c0 += c
    return enc, y_hat, enc.finish()


def _run_y_decoder(gt, lf, stream, fmt):
    dec = ec.YDecoder(stream, gt, fmt)
    y_hat = np.zeros_like(lf["y"][0])
    c0 = 0
    for i, c in enumerate(SLICE_CH_TINY):
        for half in HALVES:
            p = lf[f"params_{half}_{i}"][0]
            y_hat[c0 : c0 + c] += dec.decode_half(p[:c], p[c:], half)
        c0 += c
    dec.finish()
    return y_hat


def test_y_encoder_reproduces_fixture(tables, fx):
    gt, _, _ = tables
    lf = dict(np.load(fx / "lfgcm.npz"))
    _, _, (ys, _) = parse_stream_file((fx / "stream.bin").read_bytes())
    enc, y_hat, stream = _run_y_encoder(gt, lf, "compat")
    np.testing.assert_array_equal(enc.symbols, lf["y_symbols"])
    np.testing.assert_array_equal(enc.indexes, lf["y_indexes"])
    np.testing.assert_array_equal(y_hat, lf["y_hat"][0])
    assert stream == ys
    np.testing.assert_array_equal(_run_y_decoder(gt, lf, ys, "compat"), lf["y_hat"][0])


def test_y_native_round_trip_fixture(tables, fx):
    gt, _, _ = tables
    lf = dict(np.load(fx / "lfgcm.npz"))
    _, y_hat, stream = _run_y_encoder(gt, lf, "native")
    np.testing.assert_array_equal(y_hat, lf["y_hat"][0])
    np.testing.assert_array_equal(_run_y_decoder(gt, lf, stream, "native"), lf["y_hat"][0])


def test_gaussian_symbols_and_index_rule(tables, fx):
    gt, _, _ = tables
    lf = dict(np.load(fx / "lfgcm.npz"))
    p = lf["params_anchor_0"][0]
    sym, idx = ec.gaussian_symbols(lf["y"][0, :2], p[:2], p[2:], "anchor")
    n = sym.shape[0]
    np.testing.assert_array_equal(sym, lf["y_symbols"][:n])
    np.testing.assert_array_equal(idx, lf["y_indexes"][:n])
    # index rule vs numpy, including values exactly on the thresholds
    st_ = gt.scale_table
    special = np.concatenate([st_, np.nextafter(st_, np.float32(0)), np.nextafter(st_, np.float32(1e9)), np.float32([0, -1, 1e30, np.inf, 0.05, 0.11])])
    rng = np.random.default_rng(1)
    scales = rng.choice(special, size=(3, 10, 16)).astype(np.float32)
    zeros = np.zeros_like(scales)
    for half in HALVES:
        _, idx = ec.gaussian_symbols(zeros, scales, zeros, half, tables=gt)
        want = np.searchsorted(st_[:-1], np.maximum(squeeze_half(scales, half), np.float32(0.11)), side="left")
        np.testing.assert_array_equal(idx, want.ravel())
        np.testing.assert_array_equal(idx, gt.indexes(squeeze_half(scales, half)).ravel())


def squeeze_half(a: np.ndarray, half: str) -> np.ndarray:
    """numpy reference of the checkerboard squeeze (C, H, W) -> (C, H, W/2)."""
    out = np.empty(a.shape[:2] + (a.shape[2] // 2,), a.dtype)
    for r in range(a.shape[1]):
        even_row = r % 2 == 0
        start = (1 if even_row else 0) if half == "anchor" else (0 if even_row else 1)
        out[:, r] = a[:, r, start::2]
    return out


def test_round_half_even_symbols_and_y_hat():
    y = np.array([[[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1e9, -3.4999998]]], np.float32)
    mean = np.zeros_like(y)
    scale = np.ones_like(y)
    s_a, _ = ec.gaussian_symbols(y, scale, mean, "anchor")
    s_n, _ = ec.gaussian_symbols(y, scale, mean, "nonanchor")
    assert s_a.tolist() == [2, 0, -2, -3]
    assert s_n.tolist() == [0, 2, -2, 1000000000]
    rng = np.random.default_rng(5)
    y = rng.normal(0, 4, (3, 6, 8)).astype(np.float32)
    mu = rng.normal(0, 1, y.shape).astype(np.float32)
    sc = rng.uniform(0, 10, y.shape).astype(np.float32)
    enc = ec.YEncoder(ec._default_gaussian_index_tables())
    for half in HALVES:
        sym, _ = ec.gaussian_symbols(y, sc, mu, half)
        np.testing.assert_array_equal(sym, np.round(squeeze_half(y, half) - squeeze_half(mu, half)).astype(np.int32).ravel())
        y_hat = enc.encode_half(y, sc, mu, half)
        np.testing.assert_array_equal(squeeze_half(y_hat, half).ravel(), (sym.astype(np.float32) + squeeze_half(mu, half).ravel()))
        other = "nonanchor" if half == "anchor" else "anchor"
        assert not squeeze_half(y_hat, other).any()


# ------------------------------------------------------------ property tests
FORMAT_ST = st.sampled_from(ec.FORMATS)


@st.composite
def coding_case(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = draw(st.integers(1, 6))
    cdf, lengths, offsets = make_tables(rng, rows, max_symbols=draw(st.integers(1, 40)))
    n = draw(st.integers(0, 300))
    idx = rng.integers(0, rows, n).astype(np.int32)
    kind = rng.random(n)
    sym = (rng.integers(-3, 45, n) + offsets[idx]).astype(np.int64)
    big = rng.integers(-(2**31), 2**31, n)
    sym = np.where(kind < 0.1, big, sym)
    extremes = np.array([-(2**31), 2**31 - 1, 2**27, -(2**27) - 7, 2**28 + 3], np.int64)
    sym = np.where((kind >= 0.1) & (kind < 0.15), extremes[rng.integers(0, 5, n)], sym)
    return cdf, lengths, offsets, idx, sym.astype(np.int32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=coding_case(), fmt=FORMAT_ST)
def test_round_trip_random_tables(case, fmt):
    cdf, lengths, offsets, idx, sym = case
    t = ec.BottleneckTables(np.zeros(cdf.shape[0], np.float32), cdf, lengths, offsets)
    stream = ec.encode_with_indexes(sym, idx, t, fmt)
    np.testing.assert_array_equal(ec.decode_with_indexes(stream, idx, t, fmt), sym)
    if fmt == "compat":
        assert len(stream) % 4 == 0 and len(stream) >= 8
        assert stream == reference_encode(sym.astype(np.int64), idx, cdf, lengths, offsets)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fmt=FORMAT_ST, splits=st.lists(st.integers(0, 50), max_size=6))
def test_incremental_decode_matches(seed, fmt, splits):
    """YDecoder-style piecewise decoding equals one-shot decoding (lane bookkeeping)."""
    rng = np.random.default_rng(seed)
    cdf, lengths, offsets = make_tables(rng, 3)
    n = sum(splits) + int(rng.integers(0, 20))
    idx = rng.integers(0, 3, n).astype(np.int32)
    sym = (rng.integers(-5, 50, n) + offsets[idx]).astype(np.int32)
    t = ec.BottleneckTables(np.zeros(3, np.float32), cdf, lengths, offsets)
    stream = ec.encode_with_indexes(sym, idx, t, fmt)
    dec = ec._rans.Decoder(t._core, ec._fmt(fmt), stream)
    out, pos = [], 0
    for k in splits + [n - sum(splits)]:
        out.append(dec.decode(idx[pos : pos + k]))
        pos += k
    dec.finish()
    np.testing.assert_array_equal(np.concatenate(out) if out else np.zeros(0, np.int32), sym)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fmt=FORMAT_ST)
def test_y_coder_round_trip_random(seed, fmt):
    rng = np.random.default_rng(seed)
    gt = gaussian_like_tables(8, rng)
    c, h, w = int(rng.integers(1, 4)), int(rng.integers(1, 6)), 2 * int(rng.integers(1, 5))
    enc = ec.YEncoder(gt, fmt)
    maps = []
    for _ in range(3):
        means = rng.normal(0, 3, (c, h, w)).astype(np.float32)
        scales = rng.uniform(0, 60, (c, h, w)).astype(np.float32)
        y = (means + rng.normal(0, 10, (c, h, w)) * (rng.random((c, h, w)) < 0.9) + rng.normal(0, 1e6, (c, h, w)) * (rng.random((c, h, w)) < 0.05)).astype(np.float32)
        for half in HALVES:
            maps.append((scales, means, half, enc.encode_half(y, scales, means, half)))
    stream = enc.finish()
    dec = ec.YDecoder(stream, gt, fmt)
    for scales, means, half, want in maps:
        np.testing.assert_array_equal(dec.decode_half(scales, means, half), want)
    dec.finish()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fmt=FORMAT_ST, n_cut=st.integers(1, 64), flips=st.integers(1, 4))
def test_corrupted_streams_never_crash(seed, fmt, n_cut, flips):
    rng = np.random.default_rng(seed)
    cdf, lengths, offsets = make_tables(rng, 4)
    n = 200
    idx = rng.integers(0, 4, n).astype(np.int32)
    sym = (rng.integers(-5, 50, n) + offsets[idx]).astype(np.int32)
    t = ec.BottleneckTables(np.zeros(4, np.float32), cdf, lengths, offsets)
    stream = bytearray(ec.encode_with_indexes(sym, idx, t, fmt))
    for _ in range(flips):
        b = int(rng.integers(0, len(stream)))
        stream[b] ^= 1 << int(rng.integers(0, 8))
    for s in (bytes(stream), bytes(stream[: max(0, len(stream) - n_cut)])):
        try:
            out = ec.decode_with_indexes(s, idx, t, fmt)
        except ValueError:
            continue
        assert out.shape == (n,)


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(7)
    cdf, lengths, offsets = make_tables(rng, 4)
    t = ec.BottleneckTables(np.zeros(4, np.float32), cdf, lengths, offsets)
    idx = rng.integers(0, 4, 500).astype(np.int32)
    sym = (rng.integers(-5, 50, 500) + offsets[idx]).astype(np.int32)
    return t, idx, sym, {f: ec.encode_with_indexes(sym, idx, t, f) for f in ec.FORMATS}


@pytest.mark.parametrize("fmt", ec.FORMATS)
def test_truncated_and_empty_streams_raise(small, fmt):
    t, idx, sym, streams = small
    s = streams[fmt]
    for cut in (1, 4, 8, len(s) // 2, len(s) - 1):
        with pytest.raises(ValueError):
            ec.decode_with_indexes(s[: len(s) - cut], idx, t, fmt)
    with pytest.raises(ValueError):
        ec.decode_with_indexes(b"", idx, t, fmt)
    with pytest.raises(ValueError):
        ec.decode_with_indexes(s + b"\0\0\0\0", idx, t, fmt)


@pytest.mark.parametrize("fmt", ec.FORMATS)
def test_bit_flips_detected(small, fmt):
    """A flipped bit never decodes silently to the original symbols; without escapes
    (whose payload bits are raw, as in compressai) every flip raises ValueError."""
    t, idx, sym, streams = small
    in_range = np.clip(sym - t.offset[idx], 0, t.cdf_length[idx] - 3) + t.offset[idx]
    for data, must_raise in ((sym, False), (in_range.astype(np.int32), True)):
        s = ec.encode_with_indexes(data, idx, t, fmt)
        for p in range(0, len(s), max(1, len(s) // 60)):
            bad = bytearray(s)
            bad[p] ^= 1 << (p % 8)
            try:
                out = ec.decode_with_indexes(bytes(bad), idx, t, fmt)
            except ValueError:
                continue
            assert not must_raise, f"flip at byte {p} not detected"
            assert not np.array_equal(out, data)


@pytest.mark.parametrize("fmt", ec.FORMATS)
def test_wrong_counts_and_indexes_raise(small, fmt):
    t, idx, sym, streams = small
    s = streams[fmt]
    with pytest.raises(ValueError):
        ec.decode_with_indexes(s, idx[:-1], t, fmt)
    with pytest.raises(ValueError):
        ec.decode_with_indexes(s, np.concatenate([idx, idx[:5]]), t, fmt)
    for bad in (-1, 4, 2**31 - 1):
        bi = idx.copy()
        bi[3] = bad
        with pytest.raises(ValueError, match="index out of range"):
            ec.decode_with_indexes(s, bi, t, fmt)
        with pytest.raises(ValueError, match="index out of range"):
            ec.encode_with_indexes(sym, bi, t, fmt)
    with pytest.raises(ValueError):
        ec.encode_with_indexes(sym, idx[:-1], t, fmt)
    with pytest.raises(ValueError):
        ec.encode_with_indexes(sym.astype(np.float32), idx, t, fmt)
    with pytest.raises(ValueError):
        ec.encode_with_indexes(sym, idx, t, "zstd")


def test_native_header_checks(small):
    t, idx, _, streams = small
    s = bytearray(streams["native"])
    for pos, val in ((0, 0x00), (1, 99), (2, 4)):
        bad = bytearray(s)
        bad[pos] = val
        with pytest.raises(ValueError, match="native stream"):
            ec.decode_with_indexes(bytes(bad), idx, t, "native")
    with pytest.raises(ValueError):  # compat stream fed to the native decoder
        ec.decode_with_indexes(streams["compat"], idx, t, "native")


def test_zero_frequency_symbol_rejected():
    rng = np.random.default_rng(3)
    cdf, lengths, offsets = make_tables(rng, 1, max_symbols=10, zero_freq=True)
    t = ec.BottleneckTables(np.zeros(1, np.float32), cdf, lengths, offsets)
    f = np.diff(cdf[0, : lengths[0]])
    zero = int(np.flatnonzero(f == 0)[0])
    for fmt in ec.FORMATS:
        with pytest.raises(ValueError, match="zero frequency"):
            ec.encode_with_indexes(np.int32([zero + offsets[0]]), np.int32([0]), t, fmt)


def test_bad_tables_raise(tables):
    _, _, raw = tables
    st_, cdf, ln, off = raw["gc_scale_table"], raw["gc_quantized_cdf"], raw["gc_cdf_length"], raw["gc_offset"]
    ec.GaussianTables(st_, cdf, ln, off)
    bad = cdf.copy()
    bad[3, 2] = bad[3, 1] - 1
    with pytest.raises(ValueError, match="monotone"):
        ec.GaussianTables(st_, bad, ln, off)
    bad = cdf.copy()
    bad[5, ln[5] - 1] = 65535
    with pytest.raises(ValueError, match="65536"):
        ec.GaussianTables(st_, bad, ln, off)
    bad = cdf.copy()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match="start at 0"):
        ec.GaussianTables(st_, bad, ln, off)
    for bad_len in (1, cdf.shape[1] + 1):
        bl = ln.copy()
        bl[7] = bad_len
        with pytest.raises(ValueError, match="cdf_length"):
            ec.GaussianTables(st_, cdf, bl, off)
    with pytest.raises(ValueError, match="rows"):
        ec.GaussianTables(st_, cdf, ln[:-1], off)
    with pytest.raises(ValueError, match="ascending"):
        ec.GaussianTables(st_[::-1].copy(), cdf, ln, off)
    with pytest.raises(ValueError, match="scale_table"):
        ec.GaussianTables(st_[:-1], cdf, ln, off)
    bs = st_.copy()
    bs[4] = np.nan
    with pytest.raises(ValueError, match="scale_table"):
        ec.GaussianTables(bs, cdf, ln, off)
    with pytest.raises(ValueError, match="float32"):
        ec.GaussianTables(st_.astype(np.float64) + 1e-12, cdf, ln, off)
    with pytest.raises(ValueError, match="integer"):
        ec.GaussianTables(st_, cdf.astype(np.float32), ln, off)
    with pytest.raises(ValueError, match="medians"):
        ec.BottleneckTables(raw["eb_medians"][:-1], raw["eb_quantized_cdf"], raw["eb_cdf_length"], raw["eb_offset"])


def test_bad_y_inputs_raise(tables):
    gt, bt, _ = tables
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 4, 6)).astype(np.float32)
    sc = np.ones_like(y)
    mu = np.zeros_like(y)
    enc = ec.YEncoder(gt)
    bad = sc.copy()
    bad[1, 2, 3] = np.nan  # an anchor position (even row, odd column)
    with pytest.raises(ValueError, match="NaN scale"):
        enc.encode_half(y, bad, mu, "anchor")
    enc.encode_half(y, bad, mu, "nonanchor")  # positions of the other half are ignored
    enc = ec.YEncoder(gt)
    bad[1, 2, 3] = 1.0
    bad[1, 3, 3] = np.nan  # a non-anchor position (odd row, odd column)
    with pytest.raises(ValueError, match="NaN scale"):
        enc.encode_half(y, bad, mu, "nonanchor")
    for v in (np.inf, np.nan, 3e9):
        by = y.copy()
        by[0, 0, 1] = v
        with pytest.raises(ValueError, match="cannot be coded"):
            enc.encode_half(by, sc, mu, "anchor")
    assert len(enc) == 0  # failed halves leave nothing behind
    with pytest.raises(ValueError, match="half"):
        enc.encode_half(y, sc, mu, "middle")
    with pytest.raises(ValueError, match="float32"):
        enc.encode_half(y.astype(np.float64), sc, mu, "anchor")
    with pytest.raises(ValueError, match="shape"):
        enc.encode_half(y, sc[:1], mu, "anchor")
    with pytest.raises(ValueError, match="even width"):
        enc.encode_half(y[:, :, :5], sc[:, :, :5], mu[:, :, :5], "anchor")
    with pytest.raises(ValueError):
        ec.YEncoder(bt)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ec.YEncoder(gt, "nope")
    enc.encode_half(y, sc, mu, "anchor")
    stream = enc.finish()
    assert enc.finish() == stream
    with pytest.raises(ValueError, match="finished"):
        enc.encode_half(y, sc, mu, "nonanchor")
    dec = ec.YDecoder(stream, gt)
    with pytest.raises(ValueError):  # nothing decoded yet
        dec.finish()
    dec.decode_half(sc, mu, "anchor")
    dec.finish()
    dec = ec.YDecoder(stream, gt)
    dec.decode_half(sc, mu, "anchor")
    with pytest.raises(ValueError):  # one half too many
        dec.decode_half(sc, mu, "nonanchor")
        dec.finish()
    with pytest.raises(ValueError):
        ec.YDecoder(stream[:-4], gt).decode_half(sc, mu, "anchor")
    with pytest.raises(ValueError):
        ec.decode_z(b"", bt, (2, 3))
    with pytest.raises(ValueError):
        ec.encode_z(np.zeros((3, 2, 2), np.float32), bt)


def test_escape_range_compat_matches_compressai_range(tables):
    """Values up to |v| ~ 2^27 use compressai's exact chunk layout; beyond, the
    generalised 64-bit layout still round-trips every int32."""
    gt, _, raw = tables
    vals = np.array([0, 30, -30, 2**20, -(2**20), 2**27 - 1, -(2**27), 2**28, -(2**30), 2**31 - 1, -(2**31)], np.int32)
    idx = np.zeros(vals.size, np.int32) + 5
    for fmt in ec.FORMATS:
        s = ec.encode_with_indexes(vals, idx, gt, fmt)
        np.testing.assert_array_equal(ec.decode_with_indexes(s, idx, gt, fmt), vals)
    s = ec.encode_with_indexes(vals, idx, gt, "compat")
    assert s == reference_encode(vals.astype(np.int64), idx, raw["gc_quantized_cdf"], raw["gc_cdf_length"], raw["gc_offset"])


@pytest.mark.parametrize("shape", [(2, 3, 70), (1, 4, 96), (3, 2, 34), (1, 1, 2), (3, 4, 48), (2, 2, 16), (1, 6, 80), (2, 3, 48)])
def test_simd_kernels_match_numpy(tables, shape):
    """Wide rows exercise the full SIMD vectors (the fixture rows are short)."""
    gt, _, _ = tables
    rng = np.random.default_rng(sum(shape))
    st_ = gt.scale_table
    scales = rng.choice(np.concatenate([st_, np.nextafter(st_, np.float32(0)), rng.uniform(0, 300, 200).astype(np.float32), np.float32([0, -3, np.inf])]), size=shape).astype(np.float32)
    means = rng.normal(0, 5, shape).astype(np.float32)
    y = (means + rng.normal(0, 20, shape) + rng.choice([0, 0.5, -0.5], shape)).astype(np.float32)
    y[..., ::7] = np.round(y[..., ::7]) + np.float32(0.5)  # ties
    for fmt in ec.FORMATS:
        enc = ec.YEncoder(gt, fmt)
        outs = []
        for half in HALVES:
            y_hat = enc.encode_half(y, scales, means, half)
            sym = np.round(squeeze_half(y, half) - squeeze_half(means, half)).astype(np.int32)
            idx = np.searchsorted(st_[:-1], np.maximum(squeeze_half(scales, half), np.float32(0.11)), side="left")
            s2, i2 = ec.gaussian_symbols(y, scales, means, half, tables=gt)
            np.testing.assert_array_equal(s2, sym.ravel())
            np.testing.assert_array_equal(i2, idx.ravel())
            np.testing.assert_array_equal(squeeze_half(y_hat, half), sym.astype(np.float32) + squeeze_half(means, half))
            assert not squeeze_half(y_hat, "nonanchor" if half == "anchor" else "anchor").any()
            outs.append(y_hat)
        n = enc.symbols.size
        np.testing.assert_array_equal(enc.indexes[: n // 2], np.searchsorted(st_[:-1], np.maximum(squeeze_half(scales, "anchor"), np.float32(0.11)), side="left").ravel())
        dec = ec.YDecoder(enc.finish(), gt, fmt)
        for half, want in zip(HALVES, outs):
            np.testing.assert_array_equal(dec.decode_half(scales, means, half), want)
        dec.finish()


def test_y_decoder_rejects_nan_scales(tables):
    gt, _, _ = tables
    y = np.zeros((2, 4, 40), np.float32)
    sc = np.ones_like(y)
    enc = ec.YEncoder(gt)
    enc.encode_half(y, sc, y, "anchor")
    dec = ec.YDecoder(enc.finish(), gt)
    bad = sc.copy()
    bad[1, 3, 20] = np.nan  # odd row, even column: an anchor position
    with pytest.raises(ValueError, match="NaN scale"):
        dec.decode_half(bad, y, "anchor")
    dec.decode_half(sc, y, "anchor")  # nothing was consumed by the failed call
    dec.finish()


_DISPATCH_SCRIPT = r"""
import hashlib, sys
import numpy as np
from runtime import entropy_coding as ec
st_ = ec.default_scale_table()
rng = np.random.default_rng(7)
rows = st_.size
cdf = np.zeros((rows, 5), np.int32)
cdf[:, 1:4] = [16384, 32768, 49152]
cdf[:, 4] = 65536
gt = ec.GaussianTables(st_, cdf, np.full(rows, 5, np.int32), np.full(rows, -1, np.int32))
cdf0 = cdf.copy()
cdf0[rows // 2, 2] = cdf0[rows // 2, 1]  # symbol 1 of one row has zero frequency
gt0 = ec.GaussianTables(st_, cdf0, np.full(rows, 5, np.int32), np.full(rows, -1, np.int32))
h = hashlib.sha256()
for shape in [(3, 5, 34), (2, 4, 2), (5, 7, 48), (1, 3, 64), (4, 2, 30), (3, 4, 48), (2, 2, 16), (2, 6, 80)]:
    n = int(np.prod(shape))
    pool = np.concatenate([st_, np.nextafter(st_, np.float32(0)), np.nextafter(st_, np.float32(1e9)),
                           np.float32([0, -1, 0.05, 0.11, 1e30, np.inf, -np.inf, 300, 1e-40])])
    sc = rng.choice(pool, n).astype(np.float32).reshape(shape)
    m = rng.normal(0, 1, n).astype(np.float32).reshape(shape)
    y = (m + rng.normal(0, 3, n).astype(np.float32).reshape(shape)).astype(np.float32)
    for fmt in ec.FORMATS:
        enc = ec.YEncoder(gt, fmt)
        for half in ("anchor", "nonanchor"):
            h.update(enc.encode_half(y, sc, m, half).tobytes())
        s = enc.finish()
        h.update(s + enc.symbols.tobytes() + enc.indexes.tobytes())
        dec = ec.YDecoder(s, gt, fmt)
        for half in ("anchor", "nonanchor"):
            h.update(dec.decode_half(sc, m, half).tobytes())
        dec.finish()
# low level: escapes, bad indexes, truncation and bit flips (the vector decoder hands such
# lane groups to the scalar code: same values, same errors)
# diverse frequencies (1 .. 65536): random CDF rows of 2 .. 300 entries
width = 302
cdfr = np.zeros((rows, width), np.int32)
lens = np.zeros(rows, np.int32)
for r in range(rows):
    k = int(rng.integers(1, width - 1))
    if r == 0:
        freq = np.array([65536 - (k - 1)] + [1] * (k - 1))
    else:
        w = rng.random(k) ** 6 + 1e-9
        freq = np.maximum(1, np.floor(w / w.sum() * (65536 - k)).astype(np.int64))
        freq[int(np.argmax(freq))] += 65536 - freq.sum()
    cdfr[r, 1 : k + 1] = np.cumsum(freq)
    lens[r] = k + 1
cdfr[1, :3] = [0, 65536, 65536]  # one symbol of frequency 65536 (no escape possible)
lens[1] = 3
gtr = ec.GaussianTables(st_, cdfr, lens, -(lens // 3).astype(np.int32))
for n in (15, 16, 17, 100, 1000, 4099, 20000):
    idx = rng.integers(0, rows, n).astype(np.int32)
    v = np.floor(rng.random(n) * (lens[idx] - 2)).astype(np.int64)  # in range: 0 .. esc-1
    v[rng.random(n) < 0.005] = 400  # a few escapes
    sym = (v - lens[idx] // 3).astype(np.int32)
    sym[idx == 1] = -1  # the frequency-65536 symbol
    try:
        s = ec.encode_with_indexes(sym, idx, gtr, "native")
        d = ec.decode_with_indexes(s, idx, gtr, "native")
        assert np.array_equal(d, sym)
        h.update(s + d.tobytes())
    except ValueError as e:
        h.update(str(e).encode())
    idx = rng.integers(0, rows, n).astype(np.int32)
    sym = rng.integers(-4, 5, n).astype(np.int32)
    esc = rng.random(n) < 0.02
    sym[esc] = rng.integers(-(2 ** 31), 2 ** 31 - 1, int(esc.sum()))
    for fmt in ec.FORMATS:
        s = ec.encode_with_indexes(sym, idx, gt, fmt)
        h.update(s)
        cases = [s, s[: len(s) - 4], s + bytes(4)]
        for k in range(20):
            b = bytearray(s)
            p = int(rng.integers(0, len(b)))
            b[p] ^= 1 << int(rng.integers(0, 8))
            cases.append(bytes(b))
        bad_idx = idx.copy()
        bad_idx[n // 2] = rows
        for ix, tt in ((bad_idx, gt), (idx, gt0)):  # encoder errors: bad index, zero frequency
            try:
                h.update(ec.encode_with_indexes(sym, ix, tt, fmt))
            except ValueError as e:
                h.update(str(e).encode())
        for c in cases:
            for ix in (idx, bad_idx):
                try:
                    h.update(ec.decode_with_indexes(c, ix, gt, fmt).tobytes())
                except ValueError as e:
                    h.update(str(e).encode())
print(h.hexdigest())
"""


def test_simd_dispatch_paths_agree():
    """The AVX-512 kernels (when the CPU has them) and the portable ones give identical results."""
    import subprocess
    import sys

    def run(extra):
        env = dict(os.environ, **extra)
        env.pop("RANS_NO_AVX512", None) if not extra else None
        return subprocess.run([sys.executable, "-c", _DISPATCH_SCRIPT], env=env, check=True, capture_output=True, text=True).stdout.strip()

    assert run({}) == run({"RANS_NO_AVX512": "1"})
