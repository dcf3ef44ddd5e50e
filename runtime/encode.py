"""``python -m runtime.encode IMAGE_OR_DIR... -o OUT --engines ARTIFACT_DIR``: images -> streams.

Each image is padded to multiples of 64, encoded, and written atomically as
``<stem>.deic`` (native container) or ``<stem>.bin`` (official ``write_body`` layout with
``--format reference``). A bad input is reported and skipped; the exit code is 1 if
any input failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .bitstream import BitstreamError
from .cli import (IMAGE_SUFFIXES, add_common_options, common_config, expand_inputs, output_path, setup_logging,
                  summary, write_atomic)
from .config import CODER_FORMATS, CONTAINERS, ENTROPY_PATHS, SAMPLERS, default_steps, defaults
from .manifest import ManifestError
from .pipeline import Codec


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image ({exc})") from exc


def build_parser() -> argparse.ArgumentParser:
    d = defaults()
    p = argparse.ArgumentParser(prog="python -m runtime.encode", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="image files or directories")
    p.add_argument("-o", "--output", required=True, help="output file (one input) or directory")
    p.add_argument("--engines", required=True, help="artifact directory from `python -m export` (or a file in it)")
    p.add_argument("--format", choices=CONTAINERS, default=d.container, help="container (default: %(default)s)")
    p.add_argument("--coder", choices=CODER_FORMATS, default=d.coder_format, help="rANS stream format (default: %(default)s)")
    p.add_argument("--entropy-path", choices=ENTROPY_PATHS, default=d.entropy_path,
                   help="reference (float context model, official) or portable (integer, bit-exact on any "
                        "hardware; needs portable.npz in the artifacts) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="noise seed stored in the stream (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler, help="sampler the decoder should use")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps the decoder should use (default: 50 for ddpm/ddim, 20 for dpmpp)")
    add_common_options(p, d)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = defaults().with_(container=args.format, coder_format=args.coder, entropy_path=args.entropy_path, seed=args.seed, sampler=args.sampler,
                               steps=args.steps or default_steps(args.sampler), **common_config(args))
        items = expand_inputs(args.inputs, IMAGE_SUFFIXES)
        if not items:
            raise ValueError("no input images found")
        codec = Codec(args.engines, cfg)
    except (ValueError, FileNotFoundError, ManifestError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # release the backend (device memory, graphs, streams) however the loop ends
        out = Path(args.output)
        suffix = ".bin" if cfg.container == "reference" else ".deic"
        failed = 0
        for path, rel in tqdm(items, desc="encode", unit="img", disable=len(items) < 2, file=sys.stderr):
            try:
                result = codec.encode(load_image(path))
                dest = output_path(out, rel, suffix, len(items) == 1)
                write_atomic(dest, result.data)
            except (ValueError, BitstreamError, OSError, RuntimeError) as exc:
                failed += 1
                print(f"error: {path}: {exc}", file=sys.stderr)
                continue
            print(summary(str(path), result.timings, f"{len(result.data)} bytes, {result.bpp:.4f} bpp -> {dest}; "))
    finally:
        codec.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
