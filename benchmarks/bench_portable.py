"""Cost and robustness of the portable (integer) entropy path (issue #7).

Three measurements, written as one JSON document:

* ``rate``: bits of the portable path vs the float (reference) path on the same images
  and the same CDF tables: real rANS stream bytes, ideal bits (-log2 p with the 16-bit
  quantised CDFs, escapes included) and the y_hat error. Model: the golden fixture's
  tiny LFGCM (random weights with trained-like statistics), calibrated on the fixture
  image and ``astronaut``; evaluated on the fixture cases and held-out photos.
* ``timing``: hyper decoder + context model for a 512x768 image at the paper
  configuration (random weights, default init): float torch float32 vs portable numpy
  (float64-GEMM) encode and decode. BLAS/torch threads are fixed (``--threads``).
* ``desync``: the harness of tests/test_portable.py at several perturbation sizes:
  float path encoded with the unperturbed model and decoded with every float output of
  the entropy networks perturbed by ``rel``; portable path decoded with float64 GEMM,
  int64 GEMM and a random-summation-order GEMM.

Run: ``python -m benchmarks.bench_portable --out benchmarks/results/bench_portable.json``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _set_threads(argv: list[str]) -> int:
    # BLAS reads its thread count at import: fix it before numpy/torch are imported.
    n = 1
    if "--threads" in argv:
        n = int(argv[argv.index("--threads") + 1])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


THREADS = _set_threads(sys.argv) if __name__ == "__main__" else 0

import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from export.checkpoints import load_state_dict_file  # noqa: E402
from export.config import load_config  # noqa: E402
from export.models.lfgcm import LFGCM, load_lfgcm  # noqa: E402
from export.models.sd import load_vae  # noqa: E402
from export.portable import (  # noqa: E402
    round_symbols,
    calibrate_portable,
    calibration_samples,
    float_slice_loop,
    reference_desync,
)
from runtime import portable as rp  # noqa: E402
from runtime.entropy_coding import GaussianTables, encode_with_indexes  # noqa: E402
from runtime.portable import PortableContextModel  # noqa: E402

log = logging.getLogger("bench_portable")
REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("DIFFEIC_FIXTURE", REPO.parent / "shared/fixtures/diffeic-ref-tiny"))
SIZES = ((128, 192), (192, 256), (256, 256), (256, 384))
EVAL_PHOTOS = ("chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def ideal_bits(symbols: np.ndarray, indexes: np.ndarray, tables: GaussianTables) -> float:
    """-log2 p of every symbol under the quantised CDFs, escapes (compressai bypass) included."""
    cdf, length, offset = tables.quantized_cdf.astype(np.int64), tables.cdf_length, tables.offset
    s, i = symbols.astype(np.int64), indexes.astype(np.int64)
    v = s - offset[i]
    maxv = length[i].astype(np.int64) - 2
    esc = (v < 0) | (v >= maxv)
    vv = np.where(esc, maxv, v)
    freq = cdf[i, vv + 1] - cdf[i, vv]
    bits = float(-np.log2(freq / 65536.0).sum())
    raw = np.where(v < 0, -2 * v - 1, 2 * (v - maxv))[esc]
    nib = np.zeros(raw.shape, np.int64)
    r = raw.copy()
    while (r > 0).any():
        nib += r > 0
        r >>= 4
    bits += float((4 * (nib // 15 + 1) + 4 * nib).sum())
    return bits


def _crop(img: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = img.shape[:2]
    t, left = (H - h) // 2, (W - w) // 2
    return np.ascontiguousarray(img[t:t + h, left:left + w, :3])


def _tiny_setup() -> tuple[LFGCM, GaussianTables, dict[str, tuple[torch.Tensor, torch.Tensor]], list]:
    import skimage.data as data

    cfg = load_config(FIXTURE / "config.yaml")
    lfgcm = load_lfgcm(load_state_dict_file(FIXTURE / "lc.ckpt"), cfg)
    vae = load_vae(load_state_dict_file(FIXTURE / "sd.ckpt"), cfg)
    with np.load(FIXTURE / "entropy_tables.npz") as t:
        tables = GaussianTables.from_npz(t)
    med = lfgcm.entropy_bottleneck.medians().view(1, -1, 1, 1)
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for case in (".", "pad"):
        with np.load(FIXTURE / case / "lfgcm.npz") as d:
            inputs[f"fixture:{case}"] = (torch.from_numpy(d["control"]), torch.from_numpy(d["z_g"]))
    imgs = {}
    for name in EVAL_PHOTOS + ("astronaut",):
        photo = getattr(data, name)()
        for h, w in SIZES:
            if photo.shape[0] >= h and photo.shape[1] >= w:
                imgs[f"{name}:{h}x{w}"] = _crop(photo, h, w)
    for name, s in zip(imgs, calibration_samples(vae, imgs.values())):
        inputs[name] = (s.x01, s.z_g)
    cases = {}
    with torch.no_grad():
        for name, (x, zg) in inputs.items():
            y, z = lfgcm.analysis(x, zg)
            cases[name] = (y, torch.round(z - med) + med)
    calib = [inputs["fixture:."], inputs["astronaut:256x256"]]
    return lfgcm, tables, cases, calib


def bench_rate(lfgcm: LFGCM, params: Any, tables: GaussianTables, cases: dict) -> dict[str, Any]:
    cm = PortableContextModel(params)
    rows = []
    for name, (y, z_hat) in cases.items():
        ref = float_slice_loop(lfgcm, z_hat, round_symbols, y)
        f_sym, f_idx = ref["symbols"].numpy(), ref["indexes"].numpy()
        res = cm.encode(y.numpy(), z_hat.numpy(), tables)
        yn = y.numpy()
        rows.append({
            "image": name, "calibration": name.startswith("astronaut") or name == "fixture:.",
            "symbols": int(f_sym.size),
            "float_bytes": len(encode_with_indexes(f_sym, f_idx, tables, "compat")),
            "portable_bytes": len(res.y_string),
            "float_ideal_bits": ideal_bits(f_sym, f_idx, tables),
            "portable_ideal_bits": ideal_bits(res.symbols, res.indexes, tables),
            "index_mismatch_frac": float((f_idx != res.indexes).mean()),
            "symbol_mismatch_frac": float((f_sym != res.symbols).mean()),
            "float_yhat_mse": float(((ref["y_hat"].numpy() - yn) ** 2).mean()),
            "portable_yhat_mse": float(((res.y_hat - yn) ** 2).mean()),
        })
        r = rows[-1]
        log.info("%-28s float %7.0f bits  portable %7.0f bits  (%+.3f%%)", name, r["float_ideal_bits"],
                 r["portable_ideal_bits"], 100 * (r["portable_ideal_bits"] / r["float_ideal_bits"] - 1))
    held = [r for r in rows if not r["calibration"]]

    def tot(key: str, rs: list) -> float:
        return float(sum(r[key] for r in rs))

    return {
        "images": rows,
        "held_out": {
            "n": len(held),
            "float_ideal_bits": tot("float_ideal_bits", held),
            "portable_ideal_bits": tot("portable_ideal_bits", held),
            "ideal_bits_change_pct": 100 * (tot("portable_ideal_bits", held) / tot("float_ideal_bits", held) - 1),
            "float_bytes": tot("float_bytes", held),
            "portable_bytes": tot("portable_bytes", held),
            "stream_bytes_change_pct": 100 * (tot("portable_bytes", held) / tot("float_bytes", held) - 1),
            "max_image_ideal_bits_change_pct": max(
                100 * (r["portable_ideal_bits"] / r["float_ideal_bits"] - 1) for r in held),
            "index_mismatch_frac": float(np.mean([r["index_mismatch_frac"] for r in held])),
            "symbol_mismatch_frac": float(np.mean([r["symbol_mismatch_frac"] for r in held])),
            "float_yhat_mse": float(np.mean([r["float_yhat_mse"] for r in held])),
            "portable_yhat_mse": float(np.mean([r["portable_yhat_mse"] for r in held])),
        },
    }


def _shuffled_gemm(seed: int) -> Any:
    rng = np.random.default_rng(seed)

    def gemm(w: np.ndarray, x: np.ndarray, mode: str) -> np.ndarray:
        K = w.shape[1]
        cuts = np.sort(rng.choice(np.arange(1, K), size=min(K - 1, 7), replace=False)) if K > 1 else []
        acc = np.zeros((w.shape[0], x.shape[1]), np.float64)
        blocks = np.split(np.arange(K), cuts)
        for b in rng.permutation(len(blocks)):
            acc += (x[blocks[b]].astype(np.float64).T @ w[:, blocks[b]].T).T
        return acc.astype(np.int64)

    return gemm


def bench_desync(lfgcm: LFGCM, params: Any, tables: GaussianTables, cases: dict,
                 rels: tuple[float, ...], seeds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"float": [], "portable": {}}
    for rel in rels:
        n = d = 0
        idx_mm = 0
        for name, (y, z_hat) in cases.items():
            for seed in range(seeds):
                r = reference_desync(lfgcm, y, z_hat, tables, rel=rel, seed=seed)
                n += 1
                d += r["desync"]
                idx_mm += r["index_mismatches"] > 0
        out["float"].append({"rel": rel, "trials": n, "desyncs": d, "desync_rate": d / n,
                             "trials_with_index_mismatch": idx_mm})
        log.info("float path, rel %.3g: %d/%d desyncs", rel, d, n)
    cm = PortableContextModel(params)
    encoded = {name: cm.encode(y.numpy(), z.numpy(), tables) for name, (y, z) in cases.items()}
    variants = {"float64_gemm": PortableContextModel(params), "int64_gemm": PortableContextModel(params, gemm="int64")}
    orig = rp._gemm
    for vname in ("float64_gemm", "int64_gemm", "shuffled_order_gemm"):
        n = d = 0
        for k, (name, (y, z_hat)) in enumerate(cases.items()):
            if vname == "int64_gemm" and y.shape[2] * y.shape[3] > 16 * 16:
                continue  # numpy integer matmul is slow; the small images suffice
            dec = variants.get(vname, variants["float64_gemm"])
            if vname == "shuffled_order_gemm":
                rp._gemm = _shuffled_gemm(k)
            try:
                _, yi = dec.decode(encoded[name].y_string, z_hat.numpy().astype(np.float64), tables)
                d += not np.array_equal(yi, encoded[name].y_hat_int)
            except ValueError:
                d += 1
            finally:
                rp._gemm = orig
            n += 1
        out["portable"][vname] = {"trials": n, "desyncs": d}
        log.info("portable path, %s: %d/%d desyncs", vname, d, n)
    return out


def bench_timing(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = load_config("paper")
    lfgcm = LFGCM(**cfg.lfgcm).eval()
    with np.load(FIXTURE / "entropy_tables.npz") as t:
        tables = GaussianTables.from_npz(t)
    med = lfgcm.entropy_bottleneck.medians().view(1, -1, 1, 1)
    with torch.no_grad():
        calib = [(torch.rand(1, 3, 256, 256), torch.randn(1, 4, 32, 32))]
        t0 = time.perf_counter()
        params = calibrate_portable(lfgcm, calib)
        t_cal = time.perf_counter() - t0
        y, z = lfgcm.analysis(torch.rand(1, 3, 512, 768), torch.randn(1, 4, 64, 96))
        z_hat = torch.round(z - med) + med
    cm = PortableContextModel(params)
    yn, zn = y.numpy(), z_hat.numpy()
    times: dict[str, list[float]] = {"float_torch_context": [], "portable_encode": [], "portable_decode": [],
                                     "portable_hyper": []}
    for _ in range(repeats):  # interleaved so load changes hit all variants alike
        t0 = time.perf_counter()
        float_slice_loop(lfgcm, z_hat, round_symbols, y)
        times["float_torch_context"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = cm.encode(yn, zn, tables)
        times["portable_encode"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, yi = cm.decode(res.y_string, zn, tables)
        times["portable_decode"].append(time.perf_counter() - t0)
        assert np.array_equal(yi, res.y_hat_int)
        t0 = time.perf_counter()
        cm.hyper(zn)
        times["portable_hyper"].append(time.perf_counter() - t0)
    return {
        "config": "paper", "image": "512x768", "latent": list(yn.shape), "repeats": repeats,
        "threads": THREADS or torch.get_num_threads(), "calibration_s": t_cal,
        "min_s": {k: min(v) for k, v in times.items()}, "all_s": times,
        "portable_artifact_bytes": _artifact_size(params),
    }


def _artifact_size(params: Any) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "portable.npz"
        params.save(p)
        return p.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/bench_portable.json"))
    ap.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2, help="perturbation seeds per image in the desync harness")
    ap.add_argument("--skip", nargs="*", default=[], choices=["rate", "timing", "desync"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": {"python": platform.python_version(), "numpy": np.__version__,
                                          "torch": torch.__version__, "cpu_count": os.cpu_count(),
                                          "load_avg_start": os.getloadavg()}}
    if "rate" not in args.skip or "desync" not in args.skip:
        lfgcm, tables, cases, calib = _tiny_setup()
        params = calibrate_portable(lfgcm, calib)
        if "rate" not in args.skip:
            result["rate"] = bench_rate(lfgcm, params, tables, cases)
        if "desync" not in args.skip:
            small = {k: v for k, v in cases.items() if not k.endswith("256x384")}
            result["desync"] = bench_desync(lfgcm, params, tables, small, (2.0 ** -23, 2.0 ** -16, 2.0 ** -10),
                                            args.seeds)
    if "timing" not in args.skip:
        result["timing"] = bench_timing(args.repeats)
        log.info("timing (s, min of %d): %s", args.repeats, result["timing"]["min_s"])
    result["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
