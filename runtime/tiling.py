"""Tiled VAE decoding and encoding, and the memory budget that decides when to tile.

The SD VAE is the one network whose memory grows with the image in pixels (its mid-block
attention even with the square of the latent's size: 16 GiB of scores at 2048x2048), so
large images run it tile by tile, as diffusers' ``enable_vae_tiling`` does:

* tiles are squares of ``tile`` pixels (a multiple of 64, so every tile is a valid input of
  the exported graphs and of one static TensorRT engine), overlapping by a quarter of the
  tile; along each axis the tiles are spread evenly from the first to the last pixel, so
  all tiles have the same size and at most two overlap anywhere;
* the overlaps are blended with linear ramps: each tile's weight rises from its inner
  edges over the overlap length and is 1 elsewhere; the result is normalised by the
  summed weights, so a network that acted pixel by pixel would give exactly the untiled
  result, and no tile edge shows as a step. The SD VAE is
  not pointwise (GroupNorm statistics and attention see one tile), so tiled output differs
  from untiled output a little; the tests state by how much.

Decoding tiles the latent and blends decoded pixels; encoding tiles the image, runs the SD
VAE encoder (``vae_encoder``) per tile and blends the latent ``z_g``, then runs the LFGCM
analysis (``lfgcm_analysis``) once on the whole image. The LFGCM itself is never tiled: its
output is entropy coded, and its memory stays moderate (no attention, 1/2 resolution first).

:func:`plan_vae` makes the decision from the manifest's memory models
(:mod:`export.memory`), the budget (``RuntimeConfig.max_memory_mb``) and the request
(``RuntimeConfig.tile``: 0 automatic, -1 never, N pixels); it raises
:class:`MemoryBudgetError` when even tiling cannot fit the budget, naming what needs what.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .manifest import Manifest

log = logging.getLogger(__name__)

TILE_MULTIPLE = 64  # pixels: one z-grid cell, the granularity of every exported graph's axes
MIN_TILE = 128
# Automatic tiling never picks a larger tile: on CPU the VAE's cost per pixel grows with the
# tile (its attention), so 25 tiles of 512 px decode 2048 px in 357 s where the 9 tiles of
# 1024 px would take about 9 x 63 s (benchmarks/results/bench_tiling.json), at more memory.
MAX_AUTO_TILE = 512
OVERLAP_FRACTION = 0.25  # diffusers' tile_overlap_factor
# Measured with ONNX Runtime on CPU (benchmarks/bench_tiling.py): a run's peak RSS over the
# graph's static activation estimate, and what the process holds besides (Python, numpy,
# ONNX Runtime itself, the entropy coder).
RUNTIME_OVERHEAD = 1.6
BASE_BYTES = 1536 << 20

RunFn = Callable[[np.ndarray], np.ndarray]


class MemoryBudgetError(ValueError):
    """The image does not fit the memory budget, not even with tiling."""


# --------------------------------------------------------------------------- tile layout


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of equal tiles of ``tile`` covering ``[0, length)``, overlapping by >= ``overlap``.

    Starts are multiples of ``align`` and spread evenly; the last tile ends at ``length``.
    A ``length`` of at most ``tile`` gives one tile (of size ``length``).
    """
    if tile <= 0 or align <= 0 or not 0 <= overlap <= tile // 2:
        raise ValueError(f"bad tiling: tile {tile}, overlap {overlap} (at most tile/2), align {align}")
    if length <= tile:
        return [0]
    if (length - tile) % align:
        raise ValueError(f"length {length} - tile {tile} is not a multiple of {align}")
    n = max(2, math.ceil((length - overlap) / (tile - overlap)))
    span = (length - tile) // align
    starts = [align * round(k * span / (n - 1)) for k in range(n)]
    # neighbours overlap by at least ``overlap`` (up to rounding to ``align``)
    assert all(b - a <= tile - overlap + align for a, b in zip(starts, starts[1:])), starts
    return starts


def axis_weights(starts: Sequence[int], size: int, ramp: int) -> list[np.ndarray]:
    """Per-tile blend weights along one axis (float64): linear ramps of ``ramp`` samples at
    every tile edge that lies inside the image, 1 elsewhere. Blending divides by the summed
    weights, so they need not add up to one where more than two tiles meet."""
    out = []
    x = np.arange(size) + 0.5
    for k in range(len(starts)):
        w = np.ones(size, np.float64)
        if ramp > 0 and k > 0:
            w = np.minimum(w, x / ramp)
        if ramp > 0 and k + 1 < len(starts):
            w = np.minimum(w, (size - x) / ramp)
        out.append(w)
    return out


@dataclass(frozen=True)
class TileGrid:
    """Tile starts along both axes (in the units of the tiled array) and the tile size."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    tile_h: int
    tile_w: int
    overlap: int

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)


def tile_grid(h: int, w: int, tile: int, align: int = 1) -> TileGrid:
    overlap = int(tile * OVERLAP_FRACTION) // align * align
    rows = axis_starts(h, tile, overlap, align)
    cols = axis_starts(w, tile, overlap, align)
    return TileGrid(tuple(rows), tuple(cols), min(tile, h), min(tile, w), overlap)


def _blend(tiles: Callable[[int, int], np.ndarray], grid: TileGrid, scale: int, out_shape: tuple[int, ...]) -> np.ndarray:
    """Sum of ``tiles(row, col)`` (arrays of ``scale`` times the tile size) with ramp weights."""
    th, tw = grid.tile_h * scale, grid.tile_w * scale
    wy = axis_weights([r * scale for r in grid.rows], th, grid.overlap * scale)
    wx = axis_weights([c * scale for c in grid.cols], tw, grid.overlap * scale)
    acc = np.zeros(out_shape, np.float64)
    wsum = np.zeros(out_shape[-2:], np.float64)
    for i, r in enumerate(grid.rows):
        for j, c in enumerate(grid.cols):
            t = tiles(r, c)
            if t.shape[-2:] != (th, tw):
                raise ValueError(f"tile output has shape {t.shape}, expected (..., {th}, {tw})")
            wt = np.outer(wy[i], wx[j])
            acc[..., r * scale:r * scale + th, c * scale:c * scale + tw] += t * wt
            wsum[r * scale:r * scale + th, c * scale:c * scale + tw] += wt
    return (acc / wsum).astype(np.float32)


def decode_tiled(run: RunFn, latent: np.ndarray, tile_px: int) -> np.ndarray:
    """``run`` (the VAE decoder: latent (1, C, t, t) -> image (1, 3, 8t, 8t)) over tiles of
    ``tile_px`` pixels of the latent (1, C, h, w); returns the blended (1, 3, 8h, 8w)."""
    check_tile(tile_px)
    _, c, h, w = latent.shape
    grid = tile_grid(h, w, tile_px // 8)
    log.info("tiled VAE decode: %d x %d tiles of %d px", len(grid.rows), len(grid.cols), tile_px)

    def tile(r: int, col: int) -> np.ndarray:
        return run(np.ascontiguousarray(latent[:, :, r:r + grid.tile_h, col:col + grid.tile_w]))

    return _blend(tile, grid, 8, (1, 3, 8 * h, 8 * w))


def encode_tiled(run: RunFn, image: np.ndarray, tile_px: int, latent_channels: int) -> np.ndarray:
    """``run`` (the VAE encoder: image (1, 3, T, T) -> z_g (1, C, T/8, T/8)) over tiles of
    ``tile_px`` pixels of the image (1, 3, H, W); returns the blended z_g (1, C, H/8, W/8)."""
    check_tile(tile_px)
    _, _, hh, ww = image.shape
    grid = tile_grid(hh, ww, tile_px, align=8)  # pixel starts on the latent grid
    log.info("tiled VAE encode: %d x %d tiles of %d px", len(grid.rows), len(grid.cols), tile_px)
    lat = TileGrid(tuple(r // 8 for r in grid.rows), tuple(c // 8 for c in grid.cols), grid.tile_h // 8,
                   grid.tile_w // 8, grid.overlap // 8)

    def tile(r: int, col: int) -> np.ndarray:
        y, x = 8 * r, 8 * col
        return run(np.ascontiguousarray(image[:, :, y:y + grid.tile_h, x:x + grid.tile_w]))

    return _blend(tile, lat, 1, (1, latent_channels, hh // 8, ww // 8))


# --------------------------------------------------------------------------- the budget


def check_tile(tile: int) -> None:
    if tile < MIN_TILE or tile % TILE_MULTIPLE:
        raise ValueError(f"tile must be a multiple of {TILE_MULTIPLE} pixels and at least {MIN_TILE}, got {tile}")


def parse_tile(text: str) -> int:
    """CLI ``--tile``: ``auto`` (0), ``off`` (-1) or a size in pixels."""
    t = str(text).strip().lower()
    if t == "auto":
        return 0
    if t in ("off", "none", "no"):
        return -1
    try:
        v = int(t)
    except ValueError:
        raise ValueError(f"--tile must be auto, off or a size in pixels (multiple of {TILE_MULTIPLE}), got {text!r}")
    check_tile(v)
    return v


def parse_memory(text: str) -> int:
    """``--max-memory`` in MB: ``8G``, ``8000M``, ``8000`` (MB), or ``auto`` (0)."""
    t = str(text).strip().upper().removesuffix("B")
    if t in ("AUTO", "0"):
        return 0
    mult = {"G": 1024, "M": 1, "T": 1024 * 1024}
    try:
        v = float(t[:-1]) * mult[t[-1]] if t[-1] in mult else float(t)
    except (ValueError, IndexError):
        raise ValueError(f"--max-memory must look like 8G or 8000M, got {text!r}")
    if v < 256:
        raise ValueError(f"--max-memory {text!r} is below 256 MB; no DiffEIC model fits that")
    return int(v)


def default_budget_bytes() -> int:
    """90 % of this machine's physical memory."""
    import psutil

    return int(psutil.virtual_memory().total * 0.9)


@dataclass(frozen=True)
class VaePlan:
    """How one VAE stage runs: ``tile`` 0 = whole image, else the tile side in pixels."""

    tile: int
    estimate_bytes: float | None  # the stage's estimated peak of the whole process, if known
    reason: str


def _gb(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


def estimate_stage_bytes(manifest: Manifest, network: str, pixels: float, loaded: Sequence[str] = (),
                         retained: Sequence[str] = (), retained_pixels: float | None = None) -> float | None:
    """Peak bytes of a process running ``network`` at ``pixels`` with the weights of ``loaded``
    (sessions kept open) resident, and the scratch of ``retained`` (networks that ran earlier
    at ``retained_pixels``, default ``pixels``, and keep their arena) still allocated; None if
    a memory model is missing."""
    entries = [manifest.networks.get(n) for n in {network, *loaded, *retained}]
    if any(e is None or not e.memory for e in entries):
        return None
    weights = sum(float(e.memory["weights"]) for e in entries)  # type: ignore[union-attr]
    act = manifest.networks[network].activation_bytes(pixels)
    assert act is not None
    rp = pixels if retained_pixels is None else retained_pixels
    kept = sum(manifest.networks[r].activation_bytes(rp) or 0.0 for r in set(retained) - {network})
    return BASE_BYTES + weights + RUNTIME_OVERHEAD * (act + kept)


# host arrays beside the VAE: its float32 output (12 B/pixel) and, when tiled, the float64
# blend accumulator (24 B/pixel)
_WHOLE_EXTRA, _TILED_EXTRA = 12.0, 36.0


def plan_vae(manifest: Manifest, whole_network: str, tile_network: str, padded_hw: tuple[int, int],
             budget_bytes: int, tile_request: int, fixed: Sequence[str] = (), loaded: Sequence[str] = (),
             admits: Callable[[str, int, int], bool] | None = None, retained: Sequence[str] = ()) -> VaePlan:
    """Decide whether and how to tile a VAE stage.

    ``whole_network`` runs the stage untiled ("vae_decoder", or "image_encoder" for the
    encoder), ``tile_network`` runs one tile ("vae_decoder" / "vae_encoder"); ``fixed`` are
    the networks of the same direction that always see the whole image (the UNet, the LFGCM);
    ``loaded`` those whose weights stay resident, ``retained`` those that ran before the VAE
    on the whole image and keep their scratch (the ORT arena of the denoising step).
    ``admits(network, h, w)`` says whether the backend can run a network at that pixel size
    (a TensorRT engine profile).
    Raises MemoryBudgetError when nothing fits, ValueError for a bad ``tile_request``.
    """
    h, w = padded_hw
    pixels = float(h * w)
    for n in fixed:  # the untileable stages decide whether the image can be done at all
        est = estimate_stage_bytes(manifest, n, pixels, loaded, retained)
        if est is not None and est > budget_bytes:
            hint = ("; artifacts exported with --ort-graphs run it with fused attention, which needs far less"
                    if not n.endswith(".ort") and n + ".ort" not in manifest.networks and "unet" in n else "")
            raise MemoryBudgetError(
                f"image {h}x{w} (padded) does not fit the memory budget of {_gb(budget_bytes)} (--max-memory) even "
                f"with a tiled VAE: {n} needs about {_gb(est)} at this size (it cannot be tiled){hint}. Use a "
                "smaller image or a larger budget")
    whole = estimate_stage_bytes(manifest, whole_network, pixels, loaded, retained)
    whole_ok = admits is None or admits(whole_network, h, w)

    def tiled(tile: int) -> tuple[bool, float | None]:
        th, tw = min(tile, h), min(tile, w)
        if admits is not None and not admits(tile_network, th, tw):
            return False, None
        est = estimate_stage_bytes(manifest, tile_network, float(th * tw), loaded, retained, pixels)
        if est is None:
            return True, None
        est += _TILED_EXTRA * pixels
        return est <= budget_bytes, est

    if tile_request < 0:
        if not whole_ok:
            raise MemoryBudgetError(f"{whole_network} cannot run at {h}x{w} on this backend (engine profile) and "
                                    "tiling is off (--tile off)")
        return VaePlan(0, whole, "tiling off")
    if tile_request > 0:
        check_tile(tile_request)
        if max(h, w) <= tile_request and whole_ok:
            return VaePlan(0, whole, "the image is not larger than the tile")
        ok, est = tiled(tile_request)
        if not ok:
            why = (f"needs about {_gb(est)}, over the budget of {_gb(budget_bytes)} (--max-memory); use a smaller "
                   "--tile") if est is not None else "does not fit the engine profile (rebuild engines with --tile)"
            raise MemoryBudgetError(f"{tile_network} with {tile_request} px tiles {why}")
        return VaePlan(tile_request, est, "tile size requested")
    if whole_ok and (whole is None or whole + _WHOLE_EXTRA * pixels <= budget_bytes):
        return VaePlan(0, whole, "fits the budget untiled" if whole is not None else "no memory model: untiled")
    top = min(MAX_AUTO_TILE, max(h, w)) // TILE_MULTIPLE * TILE_MULTIPLE
    smallest: float | None = None
    for tile in range(top, MIN_TILE - 1, -TILE_MULTIPLE):
        ok, est = tiled(tile)
        if ok:
            why = (f"untiled needs about {_gb(whole)}" if whole is not None and whole_ok
                   else "the backend cannot run it untiled")
            return VaePlan(tile, est, f"{why}; budget {_gb(budget_bytes)}")
        smallest = est if est is not None else smallest
    if smallest is None:
        raise MemoryBudgetError(f"{tile_network} cannot run at {h}x{w} or at any tile size on this backend "
                                "(engine profiles); rebuild the engines with --tile or use --backend ort")
    raise MemoryBudgetError(
        f"image {h}x{w} (padded) does not fit the memory budget of {_gb(budget_bytes)} (--max-memory) even with "
        f"{MIN_TILE} px VAE tiles: about {_gb(smallest)} needed")


__all__ = ["BASE_BYTES", "MAX_AUTO_TILE", "MIN_TILE", "MemoryBudgetError", "OVERLAP_FRACTION", "RUNTIME_OVERHEAD",
           "TILE_MULTIPLE", "TileGrid", "VaePlan", "axis_starts", "axis_weights", "check_tile", "decode_tiled",
           "default_budget_bytes", "encode_tiled", "estimate_stage_bytes", "parse_memory", "parse_tile", "plan_vae",
           "tile_grid"]
