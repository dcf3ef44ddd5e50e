"""Entropy-coder tables of DiffEIC, rebuilt exactly as compressai 1.2.4 ``update(force=True)``.

This module owns the CDF tables the rANS coder needs:

* the GaussianConditional tables (``gc_*``) from the 64-entry scale table,
* the EntropyBottleneck tables (``eb_*``) from the learned density of the hyper-latent,
* ``pmf_to_quantized_cdf``: a Python port of compressai's C++ CDF builder with its exact
  integer semantics (rounding, rescaling, zero-frequency repair),
* saving/loading them as an ``.npz`` with the keys of the golden ``entropy_tables.npz``.

The PMFs are computed with torch float32 ops in compressai's exact op order, because
float64 or numpy float32 ports differ from the reference in a few CDF entries (see the
fixture README, "Bit-exact rules"). No compressai import.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from export.models.lfgcm import EntropyBottleneck, get_scale_table

log = logging.getLogger(__name__)

__all__ = [
    "PRECISION", "TAIL_MASS", "TABLE_KEYS",
    "pmf_to_quantized_cdf", "build_gaussian_tables", "build_bottleneck_tables",
    "build_tables", "save_tables", "load_tables",
]

PRECISION = 16  # compressai's entropy_coder_precision
TAIL_MASS = 1e-9  # GaussianConditional / EntropyBottleneck default

TABLE_KEYS: tuple[str, ...] = (
    "eb_quantiles", "eb_medians", "eb_offset", "eb_cdf_length", "eb_quantized_cdf",
    "gc_scale_table", "gc_offset", "gc_cdf_length", "gc_quantized_cdf",
)


def pmf_to_quantized_cdf(pmf: np.ndarray | torch.Tensor, precision: int = PRECISION) -> np.ndarray:
    """compressai's C++ ``pmf_to_quantized_cdf`` with identical integer results.

    ``pmf`` is the float32 list ``[pmf_0 .. pmf_{k-1}, tail]``; returns ``k + 1`` int32.
    """
    p = np.asarray(pmf, dtype=np.float32).reshape(-1)
    if p.size == 0 or np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("pmf must be non-empty, finite and non-negative")
    one = 1 << precision
    # float32 product (exact: power of two), then std::round = half away from zero; the
    # float64 add is exact for these magnitudes, so floor(x + 0.5) is the C++ result.
    scaled = (p * np.float32(one)).astype(np.float64)
    freq = np.floor(scaled + 0.5).astype(np.int64)
    total = int(freq.sum())
    if total == 0:
        raise ValueError("pmf quantizes to all zeros")
    freq = (freq * one) // total  # 64-bit integer rescale, floor
    cdf = np.zeros(p.size + 1, dtype=np.int64)
    np.cumsum(freq, out=cdf[1:])
    cdf[-1] = one
    # Zero-frequency repair, sequential as in C++ (each repair changes later checks).
    big = np.iinfo(np.int64).max
    for i in range(p.size):
        if cdf[i] != cdf[i + 1]:
            continue
        f = np.diff(cdf)
        cand = np.where(f > 1, f, big)
        j = int(np.argmin(cand))  # first index of the smallest frequency > 1
        if cand[j] == big:
            raise ValueError("cannot repair a zero-frequency symbol: no frequency > 1 left")
        if j < i:
            cdf[j + 1:i + 1] -= 1
        else:
            cdf[i + 1:j + 1] += 1
    return cdf.astype(np.int32)


def _pmfs_to_cdf_table(pmf: torch.Tensor, tail: torch.Tensor, pmf_length: np.ndarray,
                       max_length: int) -> np.ndarray:
    # compressai _pmf_to_cdf: row i = quantized [pmf[i, :len_i], tail_i], zero-padded.
    table = np.zeros((len(pmf_length), max_length + 2), dtype=np.int32)
    pmf_np = pmf.detach().cpu().numpy().astype(np.float32)
    tail_np = tail.detach().cpu().numpy().astype(np.float32).reshape(-1)
    for i, n in enumerate(pmf_length):
        row = pmf_to_quantized_cdf(np.concatenate([pmf_np[i, :n], tail_np[i:i + 1]]))
        table[i, :row.size] = row
    return table


def _standardized_cumulative(x: torch.Tensor) -> torch.Tensor:
    # Phi(x) = 0.5 * erfc(-(2^-0.5) x), with both constants applied as float32 scalars.
    return 0.5 * torch.erfc(float(-(2 ** -0.5)) * x)


def _gaussian_multiplier(tail_mass: float) -> float:
    # -norm.ppf(tail_mass / 2) in float64, as compressai (scipy); ndtri is norm.ppf.
    from scipy.special import ndtri

    return float(-ndtri(tail_mass / 2))


def build_gaussian_tables(scale_table: torch.Tensor | np.ndarray | None = None,
                          tail_mass: float = TAIL_MASS) -> dict[str, np.ndarray]:
    """GaussianConditional tables as ``update_scale_table(get_scale_table(), force=True)``.

    Returns ``gc_scale_table`` f32[T], ``gc_offset`` i32[T], ``gc_cdf_length`` i32[T] and
    ``gc_quantized_cdf`` i32[T, max_pmf_length + 2].
    """
    if scale_table is None:
        scale_table = get_scale_table()
    # compressai stores the table via torch.Tensor(tuple(float(s) ...)): float32.
    table = torch.as_tensor(np.asarray(scale_table, dtype=np.float32).reshape(-1))
    with torch.no_grad():
        multiplier = _gaussian_multiplier(tail_mass)
        # float32 tensor times a Python float: computed in float32, as in the reference.
        pmf_center = torch.ceil(table * multiplier).int()
        pmf_length = 2 * pmf_center + 1
        max_length = int(pmf_length.max().item())
        samples = torch.abs(torch.arange(max_length).int() - pmf_center[:, None]).float()
        samples_scale = table.unsqueeze(1).float()
        upper = _standardized_cumulative((0.5 - samples) / samples_scale)
        lower = _standardized_cumulative((-0.5 - samples) / samples_scale)
        pmf = upper - lower
        tail = 2 * lower[:, :1]
    lengths = pmf_length.numpy().astype(np.int64)
    return {
        "gc_scale_table": table.numpy().astype(np.float32),
        "gc_offset": (-pmf_center).numpy().astype(np.int32),
        "gc_cdf_length": (pmf_length + 2).numpy().astype(np.int32),
        "gc_quantized_cdf": _pmfs_to_cdf_table(pmf, tail, lengths, max_length),
    }


def build_bottleneck_tables(eb: EntropyBottleneck) -> dict[str, np.ndarray]:
    """EntropyBottleneck tables as compressai 1.2.4 ``EntropyBottleneck.update(force=True)``.

    Returns ``eb_quantiles`` f32[C,1,3], ``eb_medians`` f32[C], ``eb_offset`` i32[C],
    ``eb_cdf_length`` i32[C] and ``eb_quantized_cdf`` i32[C, max_pmf_length + 2].
    """
    with torch.no_grad():
        q = eb.quantiles.detach().to(torch.float32)
        medians = q[:, 0, 1]
        minima = torch.clamp(torch.ceil(medians - q[:, 0, 0]).int(), min=0)
        maxima = torch.clamp(torch.ceil(q[:, 0, 2] - medians).int(), min=0)
        pmf_start = medians - minima  # fractional sample grid around the median
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max().item())
        samples = torch.arange(max_length)[None, :] + pmf_start[:, None, None]  # (C, 1, L) float32
        lower = eb._logits_cumulative(samples - 0.5, stop_gradient=True)
        upper = eb._logits_cumulative(samples + 0.5, stop_gradient=True)
        # compressai 1.2.4: sign-flipped difference (rounds differently from 1.2.8's form).
        sign = -torch.sign(lower + upper)
        pmf = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))[:, 0, :]
        # Note: the upper tail is taken at the last column of the padded grid (max_length),
        # not at each channel's own last sample -- compressai's behaviour, kept on purpose.
        tail = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
    lengths = pmf_length.numpy().astype(np.int64)
    return {
        "eb_quantiles": q.numpy().astype(np.float32),
        "eb_medians": medians.numpy().astype(np.float32),
        "eb_offset": (-minima).numpy().astype(np.int32),
        "eb_cdf_length": (pmf_length + 2).numpy().astype(np.int32),
        "eb_quantized_cdf": _pmfs_to_cdf_table(pmf, tail, lengths, max_length),
    }


def build_tables(eb: EntropyBottleneck, scale_table: torch.Tensor | np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """Both table sets (the content of ``entropy_tables.npz``)."""
    tables = build_bottleneck_tables(eb)
    tables.update(build_gaussian_tables(scale_table))
    return tables


def save_tables(path: str | Path, tables: Mapping[str, np.ndarray]) -> None:
    """Write the tables as an uncompressed ``.npz`` with the ``entropy_tables.npz`` keys."""
    missing = [k for k in TABLE_KEYS if k not in tables]
    if missing:
        raise ValueError(f"tables lack keys {missing}")
    path = Path(path)
    with path.open("wb") as f:  # a file object keeps numpy from appending '.npz'
        np.savez(f, **{k: np.asarray(tables[k]) for k in TABLE_KEYS})
    log.debug("wrote entropy tables to %s", path)


def load_tables(path: str | Path) -> dict[str, np.ndarray]:
    """Read tables written by :func:`save_tables` (or the fixture's ``entropy_tables.npz``)."""
    with np.load(Path(path)) as d:
        missing = [k for k in TABLE_KEYS if k not in d.files]
        if missing:
            raise ValueError(f"{path}: entropy tables lack keys {missing}")
        return {k: d[k] for k in TABLE_KEYS}
