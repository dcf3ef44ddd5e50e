"""Benchmark of the y entropy coder on a paper-size latent (512x768 image).

Workload: y of 320x32x48 = 491,520 symbols, DiffEIC slices [8,8,8,8,16,16,32,32,96,96],
anchor then non-anchor half per slice (20 halves, one stream). Scales uniform in
0.11..20, means N(0,1), y = means + scales * N(0,1) (fixed seed). Tables: the 64
Gaussian rows of compressai (taken from the golden fixture when present, otherwise
rebuilt here with numpy/scipy following the spec; exactness is not needed for speed).

Coders, all timed end to end from float32 arrays on one thread (median of --runs):

* ``compat`` / ``native``: runtime.entropy_coding.YEncoder / YDecoder.
* ``compressai``: the official flow (numpy instead of torch for the float part, lists
  passed to ``compressai.ans`` as DiffEIC does: ``BufferedRansEncoder`` + 20
  ``encode_with_indexes`` + ``flush``; ``RansDecoder.set_stream`` + 20
  ``decode_stream``). compressai cannot be imported beside torch 2.13, so only its
  compiled ``ans`` extension is loaded, directly from the file: from an installed
  ``compressai`` package (located with ``importlib.util.find_spec``, not imported), or
  from ``--compressai-ans`` / ``$COMPRESSAI_ANS`` (the ``.so`` or an unpacked wheel,
  e.g. ``pip download compressai==1.2.8 --no-deps --only-binary :all:`` then unzip).
  Skipped with a note when not found.
* ``constriction``: its ANS stack coder with ``QuantizedGaussian`` (same workload,
  its own model, so its size is not comparable bit for bit). Skipped if not importable.

Writes JSON (``--out``) with ``results[<coder>][encode_ms|decode_ms|
encode_ns_per_symbol|decode_ns_per_symbol|bytes|overhead_vs_ideal]`` and speed
ratios vs compressai, plus a PNG bar chart (``--png``).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import glob  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runtime import entropy_coding as ec  # noqa: E402

log = logging.getLogger("bench_entropy")

SLICE_CH = [8, 8, 8, 8, 16, 16, 32, 32, 96, 96]
HALVES = ("anchor", "nonanchor")
DEFAULT_FIXTURE = Path(os.environ.get("DIFFEIC_FIXTURE", REPO.parent / "shared/fixtures/diffeic-ref-tiny"))


# ------------------------------------------------------------------ tables
def pmf_to_quantized_cdf(pmf: np.ndarray) -> np.ndarray:
    """compressai pmf_to_quantized_cdf at 16 bits (spec section 3.1)."""
    q = np.floor(np.abs(pmf.astype(np.float32) * np.float32(65536)) + 0.5) * np.sign(pmf)  # round half away
    q = q.astype(np.int64)
    total = int(q.sum())
    q = (q * 65536) // total
    cdf = np.zeros(q.size + 1, np.int64)
    cdf[1:] = np.cumsum(q)
    cdf[-1] = 65536
    for i in range(q.size):
        if cdf[i] == cdf[i + 1]:
            freq = np.diff(cdf)
            cand = np.where(freq > 1, freq, np.iinfo(np.int64).max)
            j = int(np.argmin(cand))
            if j < i:
                cdf[j + 1 : i + 1] -= 1
            else:
                cdf[i + 1 : j + 1] += 1
    return cdf


def build_gaussian_tables() -> ec.GaussianTables:
    """Paper Gaussian tables rebuilt with numpy/scipy (spec 3.2; float64 PMFs)."""
    from scipy.special import erfc
    from scipy.stats import norm

    scale_table = ec.default_scale_table()
    mult = -norm.ppf(1e-9 / 2)
    centers = np.ceil(scale_table * np.float32(mult)).astype(np.int64)
    pmf_len = 2 * centers + 1
    width = int(pmf_len.max()) + 2
    cdf = np.zeros((64, width), np.int32)
    for t, (sigma, c) in enumerate(zip(scale_table.astype(np.float64), centers)):
        d = np.abs(np.arange(2 * c + 1) - c).astype(np.float64)
        upper = 0.5 * erfc(-(2**-0.5) * (0.5 - d) / sigma)
        lower = 0.5 * erfc(-(2**-0.5) * (-0.5 - d) / sigma)
        tail = 2 * lower[0]
        row = pmf_to_quantized_cdf(np.append(upper - lower, tail))
        cdf[t, : row.size] = row
    return ec.GaussianTables(scale_table, cdf, (pmf_len + 2).astype(np.int32), (-centers).astype(np.int32))


def load_tables(fixture: Path) -> tuple[ec.GaussianTables, str]:
    f = fixture / "entropy_tables.npz"
    if f.is_file():
        return ec.GaussianTables.from_npz(np.load(f)), f"fixture {f}"
    return build_gaussian_tables(), "rebuilt with numpy/scipy"


# ---------------------------------------------------------------- workload
def make_workload(seed: int = 0, h: int = 32, w: int = 48) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for c in SLICE_CH:
        means = rng.normal(0, 1, (c, h, w)).astype(np.float32)
        scales = rng.uniform(0.11, 20, (c, h, w)).astype(np.float32)
        y = (means + scales * rng.normal(0, 1, (c, h, w)).astype(np.float32)).astype(np.float32)
        out.append({"y": y, "scales": scales, "means": means})
    return out


def ideal_bytes(tables: ec.GaussianTables, symbols: np.ndarray, indexes: np.ndarray) -> float:
    """Information content under the 16-bit tables (+ compressai bypass bits for escapes)."""
    cdf, ln, off = tables.quantized_cdf.astype(np.int64), tables.cdf_length.astype(np.int64), tables.offset.astype(np.int64)
    v = symbols.astype(np.int64) - off[indexes]
    e = ln[indexes] - 2
    esc = (v < 0) | (v >= e)
    s = np.where(esc, e, v)
    f = cdf[indexes, s + 1] - cdf[indexes, s]
    bits = float(-np.log2(f / 65536.0).sum())
    if esc.any():
        vv, ee = v[esc], e[esc]
        raw = np.where(vv < 0, -2 * vv - 1, 2 * (vv - ee))
        m = np.zeros_like(raw)
        while (raw >> (4 * m) != 0).any():
            m += (raw >> (4 * m)) != 0
        bits += float(4 * (m + m // 15 + 1).sum())
    return bits / 8


# ----------------------------------------------------------------- coders
def runtime_coder(tables: ec.GaussianTables, fmt: str) -> tuple[Callable, Callable]:
    def encode(work):
        enc = ec.YEncoder(tables, fmt)
        for sl in work:
            for half in HALVES:
                enc.encode_half(sl["y"], sl["scales"], sl["means"], half)
        return enc.finish()

    def decode(stream, work):
        dec = ec.YDecoder(stream, tables, fmt)
        outs = [dec.decode_half(sl["scales"], sl["means"], half) for sl in work for half in HALVES]
        dec.finish()
        return outs

    return encode, decode


def _squeeze(a: np.ndarray, half: str) -> np.ndarray:
    c, h, w = a.shape
    out = np.empty((c, h, w // 2), a.dtype)
    first = 1 if half == "anchor" else 0
    out[:, 0::2] = a[:, 0::2, first::2]
    out[:, 1::2] = a[:, 1::2, 1 - first :: 2]
    return out


def _unsqueeze(v: np.ndarray, half: str, shape: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    first = 1 if half == "anchor" else 0
    out[:, 0::2, first::2] = v[:, 0::2]
    out[:, 1::2, 1 - first :: 2] = v[:, 1::2]
    return out


def find_compressai_ans(explicit: str | None) -> tuple[Any | None, str]:
    cands: list[str] = []
    for p in (explicit, os.environ.get("COMPRESSAI_ANS")):
        if p:
            cands += [p] if p.endswith(".so") else glob.glob(os.path.join(p, "**", "ans*.so"), recursive=True)
    try:
        spec = importlib.util.find_spec("compressai")
    except Exception:  # noqa: BLE001 - a broken install must not stop the benchmark
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands += glob.glob(os.path.join(loc, "ans*.so"))
    for path in cands:
        try:
            s = importlib.util.spec_from_file_location("compressai.ans", path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)  # type: ignore[union-attr]
            return mod, path
        except Exception as exc:  # noqa: BLE001
            log.warning("could not load %s: %s", path, exc)
    return None, "compressai.ans not found (pass --compressai-ans PATH or set COMPRESSAI_ANS)"


def compressai_coder(ans: Any, tables: ec.GaussianTables) -> tuple[Callable, Callable]:
    st = tables.scale_table
    cdf_np, len_np, off_np = tables.quantized_cdf, tables.cdf_length, tables.offset

    def params(sl, half):
        s = np.maximum(_squeeze(sl["scales"], half), np.float32(0.11))
        idx = np.searchsorted(st[:-1], s, side="left").astype(np.int32)
        return idx, _squeeze(sl["means"], half)

    def encode(work):
        cdf, lens, offs = cdf_np.tolist(), len_np.tolist(), off_np.tolist()  # as DiffEIC: once per image
        enc = ans.BufferedRansEncoder()
        for sl in work:
            for half in HALVES:
                idx, mu = params(sl, half)
                sym = np.rint(_squeeze(sl["y"], half) - mu).astype(np.int32)
                _unsqueeze((sym.astype(np.float32) + mu), half, sl["y"].shape)  # y_hat (context input)
                enc.encode_with_indexes(sym.reshape(-1).tolist(), idx.reshape(-1).tolist(), cdf, lens, offs)
        return enc.flush()

    def decode(stream, work):
        cdf, lens, offs = cdf_np.tolist(), len_np.tolist(), off_np.tolist()
        dec = ans.RansDecoder()
        dec.set_stream(stream)
        outs = []
        for sl in work:
            for half in HALVES:
                idx, mu = params(sl, half)
                vals = dec.decode_stream(idx.reshape(-1).tolist(), cdf, lens, offs)
                sym = np.asarray(vals, np.int32).reshape(mu.shape)  # DiffEIC: torch.Tensor(list)
                outs.append(_unsqueeze(sym.astype(np.float32) + mu, half, sl["y"].shape))
        return outs

    return encode, decode


def constriction_coder() -> tuple[Callable, Callable] | None:
    try:
        import constriction  # type: ignore[import-not-found]
    except ImportError:
        return None
    rng_ = 4096
    model = constriction.stream.model.QuantizedGaussian(-rng_, rng_)

    def prep(sl, half):
        mu = _squeeze(sl["means"], half)
        sd = np.maximum(_squeeze(sl["scales"], half), np.float32(0.11))
        return mu, sd

    def encode(work):
        syms, mus, sds = [], [], []
        for sl in work:
            for half in HALVES:
                mu, sd = prep(sl, half)
                s = np.clip(np.rint(_squeeze(sl["y"], half) - mu), -rng_, rng_).astype(np.int32)
                _unsqueeze(s.astype(np.float32) + mu, half, sl["y"].shape)
                syms.append(s.ravel())
                mus.append(np.zeros(s.size))  # symbols are coded relative to the mean
                sds.append(sd.ravel().astype(np.float64))
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(np.concatenate(syms), model, np.concatenate(mus), np.concatenate(sds))
        return coder.get_compressed().tobytes()

    def decode(stream, work):
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, np.uint32).copy())
        outs = []
        for sl in work:
            for half in HALVES:
                mu, sd = prep(sl, half)
                s = coder.decode(model, np.zeros(mu.size), sd.ravel().astype(np.float64))
                outs.append(_unsqueeze(s.reshape(mu.shape).astype(np.float32) + mu, half, sl["y"].shape))
        return outs

    return encode, decode


# ------------------------------------------------------------------- main
def time_it(fn: Callable[[], Any], runs: int, warmup: int = 2) -> tuple[dict[str, float], Any]:
    """Median / min wall-clock and median thread-CPU time (ms) of ``runs`` calls.

    The thread-CPU time (``time.thread_time_ns``; the C++ work runs on the calling
    thread with the GIL released) is robust to other processes on a shared machine.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    wall, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        out = fn()
        wall.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
    return {"median": statistics.median(wall) / 1e6, "min": min(wall) / 1e6, "cpu": statistics.median(cpu) / 1e6}, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    ap.add_argument("--compressai-ans", default=None, help="path of compressai's ans*.so or an unpacked wheel")
    ap.add_argument("--out", type=Path, default=Path("bench_entropy.json"))
    ap.add_argument("--png", type=Path, default=None, help="bar chart (default: --out with .png)")
    ap.add_argument("--coders", default="compat,native,compressai,constriction")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tables, tables_src = load_tables(args.fixture)
    work = make_workload(args.seed)
    n = sum(sl["y"].size // 2 * 2 for sl in work)
    enc_ref = ec.YEncoder(tables)
    for sl in work:
        for half in HALVES:
            enc_ref.encode_half(sl["y"], sl["scales"], sl["means"], half)
    ideal = ideal_bytes(tables, enc_ref.symbols, enc_ref.indexes)
    ref_stream = enc_ref.finish()
    ref_yhat = runtime_coder(tables, "compat")[1](ref_stream, work)

    wanted = [c.strip() for c in args.coders.split(",") if c.strip()]
    coders: dict[str, tuple[Callable, Callable]] = {}
    notes: dict[str, str] = {}
    for fmt in ("compat", "native"):
        if fmt in wanted:
            coders[fmt] = runtime_coder(tables, fmt)
    if "compressai" in wanted:
        ans, where = find_compressai_ans(args.compressai_ans)
        if ans is not None:
            coders["compressai"] = compressai_coder(ans, tables)
            notes["compressai"] = f"compressai.ans loaded from {where}"
        else:
            notes["compressai"] = "skipped: " + where
    if "constriction" in wanted:
        c = constriction_coder()
        if c is not None:
            coders["constriction"] = c
            notes["constriction"] = "AnsCoder + QuantizedGaussian(-4096, 4096), own model (size not comparable bit for bit)"
        else:
            notes["constriction"] = "skipped: constriction not importable (pip install constriction)"

    results: dict[str, dict[str, Any]] = {}
    for name, (encode, decode) in coders.items():
        enc_t, stream = time_it(lambda: encode(work), args.runs)
        dec_t, outs = time_it(lambda: decode(stream, work), args.runs)
        enc_ms, dec_ms = enc_t["median"], dec_t["median"]
        exact = all(np.array_equal(a, b) for a, b in zip(outs, ref_yhat)) if name != "constriction" else None
        r = {
            "encode_ms": enc_ms,
            "decode_ms": dec_ms,
            "encode_ns_per_symbol": enc_ms * 1e6 / n,
            "decode_ns_per_symbol": dec_ms * 1e6 / n,
            "encode_min_ms": enc_t["min"],
            "decode_min_ms": dec_t["min"],
            "encode_cpu_ms": enc_t["cpu"],
            "decode_cpu_ms": dec_t["cpu"],
            "bytes": len(stream),
            "overhead_vs_ideal": len(stream) / ideal - 1,
            "y_hat_matches_compat": exact,
        }
        if name == "compressai":
            r["stream_identical_to_compat"] = stream == ref_stream
        results[name] = r
        log.info("%-12s encode %8.3f ms (%6.2f ns/sym, cpu %7.3f)  decode %8.3f ms (%6.2f ns/sym, cpu %7.3f)  %8d B  overhead %+.4f%%",
                 name, enc_ms, r["encode_ns_per_symbol"], r["encode_cpu_ms"], dec_ms, r["decode_ns_per_symbol"], r["decode_cpu_ms"], len(stream), 100 * r["overhead_vs_ideal"])
    ratios: dict[str, dict[str, float]] = {}
    if "compressai" in results:
        base = results["compressai"]
        for name, r in results.items():
            ratios[name] = {"encode_speedup": base["encode_ms"] / r["encode_ms"], "decode_speedup": base["decode_ms"] / r["decode_ms"],
                            "encode_speedup_cpu": base["encode_cpu_ms"] / r["encode_cpu_ms"], "decode_speedup_cpu": base["decode_cpu_ms"] / r["decode_cpu_ms"]}
    if "compat" in results and "native" in results:
        ratios.setdefault("native", {}).update({
            "encode_speedup_vs_compat": results["compat"]["encode_ms"] / results["native"]["encode_ms"],
            "decode_speedup_vs_compat": results["compat"]["decode_ms"] / results["native"]["decode_ms"],
            "encode_speedup_vs_compat_cpu": results["compat"]["encode_cpu_ms"] / results["native"]["encode_cpu_ms"],
            "decode_speedup_vs_compat_cpu": results["compat"]["decode_cpu_ms"] / results["native"]["decode_cpu_ms"],
        })
    report = {
        "workload": {"shape": [320, 32, 48], "symbols": n, "slices": SLICE_CH, "halves": 20, "seed": args.seed,
                     "scales": "uniform(0.11, 20)", "means": "N(0,1)", "y": "means + scales*N(0,1)",
                     "tables": tables_src, "ideal_bytes": ideal, "escapes": int(((enc_ref.symbols - tables.offset[enc_ref.indexes]) < 0).sum() + ((enc_ref.symbols - tables.offset[enc_ref.indexes]) >= tables.cdf_length[enc_ref.indexes] - 2).sum())},
        "runs": args.runs,
        "threads": 1,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "timing": "encode_ms/decode_ms: median wall clock; *_min_ms: fastest run; *_cpu_ms: median thread CPU time",
        "results": results,
        "ratios": ratios,
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for k, v in notes.items():
        log.info("%s: %s", k, v)
    log.info("ratios: %s", json.dumps(ratios))
    png = args.png or args.out.with_suffix(".png")
    try:
        plot(results, png, n)
        log.info("wrote %s and %s", args.out, png)
    except Exception as exc:  # noqa: BLE001 - the chart is optional
        log.warning("no chart: %s", exc)
    return report


def plot(results: dict[str, dict[str, Any]], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    enc = [results[k]["encode_ms"] for k in names]
    dec = [results[k]["decode_ms"] for k in names]
    b1 = ax.bar(x - 0.2, enc, 0.4, label="encode")
    b2 = ax.bar(x + 0.2, dec, 0.4, label="decode")
    ax.bar_label(b1, fmt="%.2f", fontsize=8)
    ax.bar_label(b2, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title(f"y entropy coding, {n:,} symbols, 1 thread, end to end from float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
