"""What the encode and decode CLIs share: input discovery, atomic writes, the summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .config import BACKENDS, RuntimeConfig
from .pipeline import Timings, peak_rss_mb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
STREAM_SUFFIXES = (".deic", ".bin")


def expand_inputs(paths: Sequence[str], suffixes: Iterable[str]) -> list[tuple[Path, Path]]:
    """Files given directly, plus matching files under directories (recursively).

    Returns (file, path relative to its root) pairs so directory structure is kept.
    """
    suffixes = tuple(suffixes)
    out: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in suffixes:
                    out.append((f, f.relative_to(p)))
        elif p.exists():
            out.append((p, Path(p.name)))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def output_path(out: Path, rel: Path, suffix: str, single: bool) -> Path:
    """``-o`` names the file when one input goes to a path with a suffix; else a directory."""
    if single and out.suffix and not out.is_dir():
        return out
    return out / rel.with_suffix(suffix)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: no half-written outputs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def summary(name: str, timings: Timings, extra: str = "") -> str:
    stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.stages.items())
    return f"{name}: {extra}{stages}; peak RSS {peak_rss_mb():.0f} MB"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def add_common_options(p: argparse.ArgumentParser, d: RuntimeConfig) -> None:
    """Options every runtime CLI takes: backend, threads, memory budget, tiling, verbosity."""
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (0: all)")
    p.add_argument("--max-memory", default="auto", metavar="SIZE",
                   help="memory budget, e.g. 8G or 6000M (default: 90%% of physical memory); images that would "
                        "exceed it run the VAE in tiles, or are refused with the reason")
    p.add_argument("--tile", default="auto", metavar="PX",
                   help="VAE tiles: auto (only above the budget), off, or a tile side in pixels (multiple of 64)")
    p.add_argument("-v", "--verbose", action="store_true")


def common_config(args: argparse.Namespace) -> dict[str, int | str]:
    """RuntimeConfig fields from the options of :func:`add_common_options` (ValueError if bad)."""
    from .tiling import parse_memory, parse_tile

    return {"backend": args.backend, "threads": args.threads, "max_memory_mb": parse_memory(args.max_memory),
            "tile": parse_tile(args.tile)}
