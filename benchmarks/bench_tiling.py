"""Peak memory and time of the VAE decoder against image size, tiled vs untiled, and one
whole decode of a large image within this machine's memory (ONNX Runtime, CPU).

Every measurement runs in its own subprocess, so ``peak_rss_mb`` is that process's
``getrusage`` maximum (load, weights and all). Per image side (square, random latent):

* ``untiled``: the VAE decoder on the whole latent (``--tile off``). Sizes whose estimated
  peak (``runtime.tiling``, from the manifest's memory models) is over the budget are not
  run (they would only be killed by the OOM killer); the estimate is reported;
* ``tiled``: the same with ``--tile`` px tiles (default 512);
* each row also has the runtime's own estimate, to show how the budget model compares.

``--full-decode 2048``: encode a 2048x2048 photo (skimage's ``astronaut``, upscaled) and
decode the stream with the default settings (automatic tiling under the default budget,
DDIM with ``--steps`` steps), recording peak RSS, the tiles chosen and stage times.

    python benchmarks/bench_tiling.py --artifacts ART [--sizes 256 512 1024 2048 4096] [--tile 512]
        [--estimate-only 4096] [--full-decode 2048 --steps 1] [--out benchmarks/results/bench_tiling.json]

``ART`` is an export of the paper configuration (random weights are fine: memory and time
do not depend on the values), e.g. ``python -m export --preset paper --random-init
--skip-split --ort-graphs --out ART``. Writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _child_vae(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from runtime.config import defaults
    from runtime.pipeline import Codec

    codec = Codec(args.artifacts, defaults().with_(tile=args.tile_req, threads=args.threads))
    side = args.side
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 4, side // 8, side // 8)).astype(np.float32)
    from runtime.tiling import decode_tiled

    run = lambda z: codec.backend.run("vae_decoder", {"latent": z})["decoded"]  # noqa: E731
    t0 = time.perf_counter()  # the VAE alone: not Codec.vae_decode, whose budget also counts the UNet
    decoded, tile = (decode_tiled(run, latent, args.tile_req), args.tile_req) if args.tile_req > 0 else (run(latent), 0)
    dt = time.perf_counter() - t0
    assert decoded.shape == (1, 3, side, side)
    return {"seconds": dt, "tile": tile}


def _child_full(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from PIL import Image
    from skimage import data

    from runtime.config import defaults
    from runtime.pipeline import Codec

    side = args.side
    img = np.asarray(Image.fromarray(data.astronaut()).resize((side, side), Image.BICUBIC))
    codec = Codec(args.artifacts, defaults().with_(threads=args.threads, sampler="ddim", steps=args.steps))
    t0 = time.perf_counter()
    enc = codec.encode(img)
    t_enc = time.perf_counter() - t0
    enc_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    dec = codec.decode(enc.data)
    t_dec = time.perf_counter() - t0
    assert dec.image.shape == img.shape
    return {"encode_seconds": t_enc, "decode_seconds": t_dec, "encode_peak_rss_mb": enc_rss,
            "encode_vae_tile": enc.vae_tile, "decode_vae_tile": dec.vae_tile, "bytes": len(enc.data),
            "bpp": enc.bpp, "steps": args.steps, "encode_stages_s": enc.timings.stages,
            "decode_stages_s": dec.timings.stages}


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what")
    p.add_argument("--artifacts")
    p.add_argument("--side", type=int)
    p.add_argument("--tile-req", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    a = p.parse_args(argv)
    out = _child_vae(a) if a.what == "vae" else _child_full(a)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def run_child(*args: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]}


def estimate(artifacts: str, side: int, tile: int) -> dict[str, Any]:
    from runtime.manifest import load_manifest
    from runtime.tiling import default_budget_bytes, estimate_stage_bytes

    m, _ = load_manifest(artifacts)
    t = min(tile, side) if tile > 0 else side
    est = estimate_stage_bytes(m, "vae_decoder", float(t * t), ["vae_decoder"])
    extra = (36.0 if tile > 0 else 12.0) * side * side
    return {"estimate_mb": ((est or 0) + extra) / 2**20, "budget_mb": default_budget_bytes() / 2**20}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, color in (("untiled", "tab:red"), ("tiled", "tab:blue")):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        run = [r for r in rows if "peak_rss_mb" in r]
        a1.plot([r["side"] for r in run], [r["peak_rss_mb"] / 1024 for r in run], "o-", color=color,
                label=f"{mode}: measured peak RSS")
        a1.plot([r["side"] for r in rows], [r["estimate_mb"] / 1024 for r in rows], "x--", color=color, alpha=0.6,
                label=f"{mode}: runtime estimate")
        a2.plot([r["side"] for r in run], [r["seconds"] for r in run], "o-", color=color, label=mode)
    a1.axhline(result["budget_mb"] / 1024, color="gray", ls=":", label="default budget (90% of RAM)")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("image side (px, square)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    a1.set_ylabel("GiB")
    a2.set_ylabel("VAE decoder seconds")
    fig.suptitle(f"SD VAE decoder (paper config), ONNX Runtime CPU, {result['threads']} threads, "
                 f"tiles of {result['tile']} px")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--estimate-only", type=int, nargs="*", default=[],
                   help="sides to report the runtime's estimate for without running them (too slow here)")
    p.add_argument("--full-decode", type=int, default=0, help="also encode+decode one image of this side")
    p.add_argument("--steps", type=int, default=1, help="DDIM steps of the full decode (memory does not depend on it)")
    p.add_argument("--timeout", type=float, default=3 * 3600)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_tiling.json")
    a = p.parse_args()
    result: dict[str, Any] = {
        "artifacts": str(a.artifacts), "tile": a.tile, "threads": a.threads or os.cpu_count(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "load_average_start": os.getloadavg(), "rows": [],
    }
    for side in sorted({*a.sizes, *a.estimate_only}):
        for mode, req in (("untiled", -1), ("tiled", a.tile)):
            row: dict[str, Any] = {"side": side, "mode": mode, **estimate(a.artifacts, side, req)}
            result["budget_mb"] = row.pop("budget_mb")
            if side in a.estimate_only and side not in a.sizes:
                row["note"] = "not run: estimate only (--estimate-only)"
            elif mode == "tiled" and side <= a.tile:
                row["note"] = "one tile: same as untiled"
            elif row["estimate_mb"] > result["budget_mb"]:
                row["note"] = "not run: estimated peak over the budget (would be OOM-killed)"
            else:
                row.update(run_child("vae", "--artifacts", a.artifacts, "--side", str(side), "--tile-req", str(req),
                                     "--threads", str(a.threads), timeout=a.timeout))
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1))
    if a.full_decode:
        full = run_child("full", "--artifacts", a.artifacts, "--side", str(a.full_decode), "--threads", str(a.threads),
                         "--steps", str(a.steps), timeout=a.timeout)
        full["side"] = a.full_decode
        result["full_decode"] = full
        print(json.dumps(full), flush=True)
    result["load_average_end"] = os.getloadavg()
    a.out.write_text(json.dumps(result, indent=1))
    plot(result, a.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
