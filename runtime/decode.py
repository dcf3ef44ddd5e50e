"""``python -m runtime.decode STREAM_OR_DIR... -o OUT --engine ARTIFACT_DIR/<file or dir>``: streams -> PNG.

Sampler, steps and seed come from the stream (native container) unless given here.
``--noise FILE.npz`` replays recorded initial noise (``x_T``) and, for DDPM, per-step
noise (``noise``), so a run can be compared with a recorded one. Bad streams are
reported and skipped, never written; the exit code is 1 if any input failed.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .bitstream import BitstreamError
from .cli import (STREAM_SUFFIXES, add_common_options, common_config, expand_inputs, output_path, setup_logging,
                  summary, write_atomic)
from .config import SAMPLERS, defaults
from .manifest import ManifestError
from .pipeline import Codec
from .sampler import ReplayNoise

MAX_STREAM_BYTES = 64 << 20  # far above any DiffEIC stream; refuses to read arbitrary huge files


def build_parser() -> argparse.ArgumentParser:
    d = defaults()
    p = argparse.ArgumentParser(prog="python -m runtime.decode", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="stream files or directories")
    p.add_argument("-o", "--output", required=True, help="output PNG (one input) or directory")
    p.add_argument("--engine", "--engines", dest="engine", required=True,
                   help="artifact directory, or any engine/graph file inside it (e.g. engines/unet.plan)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: from the stream, else 50; 20 for dpmpp)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: from the stream, else ddpm)")
    p.add_argument("--noise", default=None, help=".npz with x_T (and per-step `noise` for DDPM) to replay")
    p.add_argument("--size", default=None, help="HxW crop for reference-layout streams (they carry no size)")
    add_common_options(p, d)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = defaults().with_(**common_config(args))
        crop = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"--size must look like 120x180, got {args.size!r}")
        noise = ReplayNoise.from_npz(args.noise) if args.noise else None
        items = expand_inputs(args.inputs, STREAM_SUFFIXES)
        if not items:
            raise ValueError("no input streams found")
        codec = Codec(args.engine, cfg)
    except (ValueError, FileNotFoundError, ManifestError, OSError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # release the backend (device memory, graphs, streams) however the loop ends
        out = Path(args.output)
        failed = 0
        for path, rel in tqdm(items, desc="decode", unit="img", disable=len(items) < 2, file=sys.stderr):
            try:
                if path.stat().st_size > MAX_STREAM_BYTES:
                    raise BitstreamError(f"file is {path.stat().st_size} bytes, larger than any DiffEIC stream")
                data = path.read_bytes()
                bar = tqdm(desc=f"sample {path.name}", unit="step", leave=False, file=sys.stderr)

                def on_step(i: int, n: int) -> None:
                    bar.total = n
                    bar.update(1)

                try:
                    result = codec.decode(data, sampler=args.sampler, steps=args.steps, noise=noise,
                                          crop_hw=crop, on_step=on_step)
                finally:
                    bar.close()
                buf = io.BytesIO()
                Image.fromarray(result.image).save(buf, format="PNG")
                dest = output_path(out, rel, ".png", len(items) == 1)
                write_atomic(dest, buf.getvalue())
            except (ValueError, BitstreamError, OSError, RuntimeError) as exc:
                failed += 1
                print(f"error: {path}: {exc}", file=sys.stderr)
                continue
            h, w = result.image.shape[:2]
            bpp = len(data) * 8.0 / (h * w)
            print(summary(str(path), result.timings, f"{bpp:.4f} bpp, {w}x{h} -> {dest}; "))
    finally:
        codec.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
