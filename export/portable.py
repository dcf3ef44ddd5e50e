"""Export side of the portable entropy path: calibration and integer quantisation.

:func:`calibrate_portable` runs the float LFGCM (torch) on calibration inputs, records
the range of every activation that the integer path carries (hyper decoder, channel
context, local context, entropy-parameter heads, z_hat, y_hat), and turns the float
weights into the :class:`runtime.portable.PortableParams` integer artifact:

* activations are int16 with power-of-two scales 2^-e, per tensor where a GELU follows
  (the GELU lookup table is indexed by the int16 value, so one table per exponent) and
  per channel elsewhere; per-input-channel scales are folded into the next layer's
  weights, so they cost nothing at run time;
* weights are int16 per output channel with a power-of-two scale 2^-k chosen so the
  largest |weight| of the channel lies in [2^14, 2^15); biases are int64 in accumulator
  units; requantisation is a rounding right shift by ``k - e_out``;
* the scale half of each head's last layer is never requantised: its accumulator is
  compared against integer thresholds ``floor(table[j] * 2^k)`` which reproduce the
  compressai index rule exactly for that fixed-point scale;
* the mean half is shifted onto the grid 2^-F (``mean_frac_bits``).

Everything here runs once at export time; the exact semantics at run time live in
``runtime/portable.py`` and ``docs/portable-entropy.md``.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from export.models.layers import (
    ckbd_anchor_squeeze,
    ckbd_anchor_unsqueeze,
    ckbd_nonanchor_squeeze,
    ckbd_nonanchor_unsqueeze,
)
from export.models.lfgcm import LFGCM, build_indexes, get_scale_table
from runtime.portable import FORMAT_VERSION as PORTABLE_FORMAT_VERSION
from runtime.portable import (
    ACT_NONE,
    GEMM_BOUND,
    W_MAX,
    IntLayer,
    PortableParams,
)

log = logging.getLogger(__name__)

__all__ = [
    "PORTABLE_FORMAT_VERSION", "CalibrationSample", "calibrate_portable", "write_portable", "calibration_images",
    "calibration_samples", "gelu_lut", "perturbed_float_networks", "float_slice_loop",
    "reference_encode", "reference_desync", "round_symbols",
]

#: Default activation headroom: calibrated max |x| maps to 2^(15 - headroom) (x4 margin).
HEADROOM_BITS = 2
#: Means and y_hat live on the grid 2^-12.
MEAN_FRAC_BITS = 12
#: Exponent range of activation scales.
E_MIN, E_MAX = -20, 24


@dataclass
class CalibrationSample:
    """One calibration input of the LFGCM: image in [0, 1] (1, 3, H, W) and z_g (1, 4, H/8, W/8)."""

    x01: torch.Tensor
    z_g: torch.Tensor


# =========================================================================== calibration inputs

def calibration_images(sizes: Sequence[tuple[int, int]] = ((256, 256), (192, 256))) -> list[np.ndarray]:
    """The bundled scikit-image photos (astronaut, coffee, chelsea, rocket), centre-cropped.

    Each photo is cropped to every size in ``sizes`` (multiples of 64), uint8 (H, W, 3).
    """
    import skimage.data as data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(data, name)()[..., :3]
        for h, w in sizes:
            H, W = img.shape[:2]
            if h > H or w > W:
                continue
            t, l = (H - h) // 2, (W - w) // 2
            out.append(np.ascontiguousarray(img[t:t + h, l:l + w]))
    return out


@torch.no_grad()
def calibration_samples(vae: Any, images: Iterable[np.ndarray]) -> list[CalibrationSample]:
    """(x01, z_g) pairs from uint8 images with export's VAE (``encode_moments``, ``scale_factor``).

    The images must already have sides that are multiples of 64.
    """
    out = []
    for img in images:
        if img.shape[0] % 64 or img.shape[1] % 64:
            raise ValueError(f"calibration image {img.shape[:2]} is not padded to multiples of 64")
        x = torch.tensor(img[None] / 255.0, dtype=torch.float32).clamp_(0, 1).permute(0, 3, 1, 2).contiguous()
        moments = vae.encode_moments(x * 2 - 1)
        out.append(CalibrationSample(x, moments[:, : vae.embed_dim] * vae.scale_factor))
    return out


# =========================================================================== statistics

class _MaxAbs:
    """Per-output-channel running max |x| of a module's output, recorded by a forward hook."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        m = output.detach().abs().amax(dim=(0, 2, 3)).to(torch.float64)
        self.value = m if self.value is None else torch.maximum(self.value, m)


def _float_modules(lfgcm: LFGCM) -> dict[str, nn.Module]:
    """Float conv modules by the integer layer name they become."""
    mods: dict[str, nn.Module] = {}
    hd = lfgcm.hyper_dec.hyper_dec
    for j, idx in enumerate((0, 2, 4)):
        mods[f"hyper.{j}"] = hd[idx]
    for i in range(lfgcm.slice_num):
        if i:
            for j, idx in enumerate((0, 2, 4)):
                mods[f"cc{i}.{j}"] = lfgcm.channel_context[i].fushion[idx]
        mods[f"lc{i}"] = lfgcm.local_context[i]
        for j, idx in enumerate((0, 2, 4)):
            mods[f"epa{i}.{j}"] = lfgcm.entropy_parameters_anchor[i].fusion[idx]
            mods[f"epn{i}.{j}"] = lfgcm.entropy_parameters_nonanchor[i].fusion[idx]
    return mods


@torch.no_grad()
def _collect_stats(lfgcm: LFGCM, samples: Sequence[CalibrationSample], medians: torch.Tensor,
                   scale_table: torch.Tensor) -> dict[str, np.ndarray]:
    mods = _float_modules(lfgcm)
    hooks = {name: _MaxAbs() for name in mods}
    handles = [mods[n].register_forward_hook(hooks[n]) for n in mods]
    z_max = torch.zeros(lfgcm.N, dtype=torch.float64)
    y_max = torch.zeros(lfgcm.M, dtype=torch.float64)
    try:
        for k, s in enumerate(samples):
            out = lfgcm.compress_symbols(s.x01.to(torch.float32), s.z_g.to(torch.float32), medians, scale_table)
            z_max = torch.maximum(z_max, out["z_hat"].abs().amax(dim=(0, 2, 3)).double())
            # y and y_hat: the context input must cover both (y_hat = y rounded to the bins).
            yy = torch.maximum(out["y_hat"].abs(), out["y"].abs())
            y_max = torch.maximum(y_max, yy.amax(dim=(0, 2, 3)).double())
            log.debug("calibration sample %d: %s", k, tuple(s.x01.shape))
    finally:
        for h in handles:
            h.remove()
    stats = {name: h.value.numpy() for name, h in hooks.items() if h.value is not None}
    stats["z_hat"] = z_max.numpy()
    stats["y_hat"] = y_max.numpy()
    return stats


# =========================================================================== quantisation

def _exp_for(maxabs: np.ndarray | float, headroom_bits: int, hi: int = E_MAX) -> np.ndarray:
    """Largest e with maxabs * 2^(e + headroom) <= 32767, clipped to [E_MIN, hi]."""
    m = np.asarray(maxabs, np.float64)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(W_MAX / np.maximum(m, 1e-30))) - headroom_bits
    return np.clip(e, E_MIN, hi).astype(np.int64)


def gelu_lut(e: int) -> np.ndarray:
    """int16 table over the int16 domain: round(gelu(X * 2^-e) * 2^e) (exact erf GELU, float64)."""
    from scipy.special import erf

    x = np.arange(-32768, 32768, dtype=np.float64) * 2.0 ** -e
    g = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    return np.clip(np.rint(g * 2.0 ** e), -32768, 32767).astype(np.int16)


class _Builder:
    """Quantises layer after layer, threading the actual exponents through."""

    def __init__(self, headroom_bits: int, mean_frac_bits: int, scale_table: np.ndarray) -> None:
        self.hb = headroom_bits
        self.F = mean_frac_bits
        self.table = np.asarray(scale_table, np.float32).astype(np.float64)
        self.luts: list[np.ndarray] = []
        self.lut_index: dict[int, int] = {}
        self.layers: dict[str, IntLayer] = {}
        self.thresholds: dict[str, np.ndarray] = {}
        self.err: dict[str, float] = {}

    def lut(self, e: int) -> int:
        if e not in self.lut_index:
            self.lut_index[e] = len(self.luts)
            self.luts.append(gelu_lut(e))
        return self.lut_index[e]

    def layer(self, name: str, mod: nn.Module, e_in: np.ndarray, out_max: np.ndarray | None, *,
              gelu: bool = False, final: str | None = None) -> np.ndarray:
        """Quantise one conv / transposed conv; returns the output exponents (per channel).

        ``out_max``: calibrated per-channel max |output| (unused for final layers).
        ``final``: threshold key ("a{i}" / "n{i}") for the last layer of a head.
        """
        deconv = isinstance(mod, nn.ConvTranspose2d)
        w = mod.weight.detach().double().numpy()
        b = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(w.shape[1 if deconv else 0])
        scale_in = np.ldexp(1.0, -e_in.astype(np.int64))
        if deconv:  # (C, O, k, k)
            w_eff = w * scale_in[:, None, None, None]
            mx = np.abs(w_eff).max(axis=(0, 2, 3))
            n_terms = w.shape[0] * w.shape[2] * w.shape[3]
        else:  # (O, C, k, k)
            w_eff = w * scale_in[None, :, None, None]
            mx = np.abs(w_eff).max(axis=(1, 2, 3))
            n_terms = w.shape[1] * w.shape[2] * w.shape[3]
        O = mx.shape[0]
        with np.errstate(divide="ignore"):
            k = np.floor(np.log2(W_MAX / np.maximum(mx, 1e-300))).astype(np.int64)
        k = np.where(mx > 0, k, 24)
        # Keep accumulators far from 2^53 (the float64 GEMM bound) and the bias in range.
        while True:
            kk = k[None, :, None, None] if deconv else k[:, None, None, None]
            w_int = np.clip(np.rint(np.ldexp(w_eff, kk)), -W_MAX, W_MAX)
            b_int = np.rint(np.ldexp(b, k))
            abs_sum = np.abs(w_int).sum(axis=(0, 2, 3) if deconv else (1, 2, 3))
            bad = abs_sum * 32767 + np.abs(b_int) >= GEMM_BOUND / 4
            if not bad.any():
                break
            k = np.where(bad, k - 1, k)
        w_int = w_int.astype(np.int16)
        b_int = b_int.astype(np.int64)
        # Relative weight error, reported in the meta data.
        back = np.ldexp(w_int.astype(np.float64), -(k[None, :, None, None] if deconv else k[:, None, None, None]))
        self.err[name] = float(np.abs(back - w_eff).max() / max(np.abs(w_eff).max(), 1e-30))
        if final is not None:
            c = O // 2
            shift = np.zeros(O, np.int64)
            shift[c:] = k[c:] - self.F
            thr = np.floor(self.table[None, :63] * np.ldexp(1.0, k[:c])[:, None]).astype(np.int64)
            self.thresholds[final] = thr
            act, e_out = ACT_NONE, None
        else:
            assert out_max is not None
            if gelu:
                e = int(_exp_for(float(out_max.max()), self.hb))
                e = min(e, int(k.min()))  # shifts must be >= 0
                e_out = np.full(O, e, np.int64)
                act = self.lut(e)
            else:
                e_out = np.minimum(_exp_for(out_max, self.hb), k)
                act = ACT_NONE
            shift = k - e_out
        self.layers[name] = IntLayer(
            name=name, kind="deconv" if deconv else "conv", weight=w_int, bias=b_int,
            shift=shift.astype(np.int32), act=act, stride=int(mod.stride[0]), padding=int(mod.padding[0]),
            output_padding=int(mod.output_padding[0]) if deconv else 0)
        log.debug("%s: %d terms, k in [%d, %d], weight rel err %.2e", name, n_terms, k.min(), k.max(), self.err[name])
        return e_out if e_out is not None else np.zeros(0, np.int64)


@torch.no_grad()
def calibrate_portable(lfgcm: LFGCM, images: Sequence[CalibrationSample | tuple[torch.Tensor, torch.Tensor]],
                       medians: torch.Tensor | np.ndarray | None = None,
                       scale_table: torch.Tensor | np.ndarray | None = None,
                       headroom_bits: int = HEADROOM_BITS, mean_frac_bits: int = MEAN_FRAC_BITS) -> PortableParams:
    """Calibrate on ``images`` ((x01, z_g) pairs) and quantise the LFGCM's entropy networks.

    ``medians`` default to the EntropyBottleneck quantiles, ``scale_table`` to the
    compressai 64-entry table (both as the exported tables hold them).
    """
    samples = [s if isinstance(s, CalibrationSample) else CalibrationSample(*s) for s in images]
    if not samples:
        raise ValueError("calibrate_portable needs at least one calibration image")
    lfgcm = lfgcm.eval()
    med = lfgcm.entropy_bottleneck.medians() if medians is None else torch.as_tensor(medians, dtype=torch.float32)
    table = get_scale_table() if scale_table is None else torch.as_tensor(scale_table, dtype=torch.float32)
    stats = _collect_stats(lfgcm, samples, med, table)
    F = int(mean_frac_bits)
    B = _Builder(headroom_bits, F, table.numpy())
    mods = _float_modules(lfgcm)

    z_exp = _exp_for(stats["z_hat"], headroom_bits)
    y_exp = np.minimum(_exp_for(stats["y_hat"], headroom_bits), F)

    e = B.layer("hyper.0", mods["hyper.0"], z_exp, stats["hyper.0"], gelu=True)
    e = B.layer("hyper.1", mods["hyper.1"], e, stats["hyper.1"], gelu=True)
    e_hyp = B.layer("hyper.2", mods["hyper.2"], e, stats["hyper.2"])
    c0 = 0
    for i, c in enumerate(lfgcm.slice_ch):
        e_cc = np.zeros(0, np.int64)
        if i:
            e = B.layer(f"cc{i}.0", mods[f"cc{i}.0"], y_exp[:c0], stats[f"cc{i}.0"], gelu=True)
            e = B.layer(f"cc{i}.1", mods[f"cc{i}.1"], e, stats[f"cc{i}.1"], gelu=True)
            e_cc = B.layer(f"cc{i}.2", mods[f"cc{i}.2"], e, stats[f"cc{i}.2"])
        e_lc = B.layer(f"lc{i}", mods[f"lc{i}"], y_exp[c0:c0 + c], stats[f"lc{i}"])
        for head, e_in in (("epa", np.concatenate([e_cc, e_hyp])), ("epn", np.concatenate([e_lc, e_cc, e_hyp]))):
            e = B.layer(f"{head}{i}.0", mods[f"{head}{i}.0"], e_in, stats[f"{head}{i}.0"], gelu=True)
            e = B.layer(f"{head}{i}.1", mods[f"{head}{i}.1"], e, stats[f"{head}{i}.1"], gelu=True)
            B.layer(f"{head}{i}.2", mods[f"{head}{i}.2"], e, None, final=f"{head[2]}{i}")
        c0 += c

    meta = {
        "calibration_images": len(samples),
        "calibration_sizes": [list(s.x01.shape[2:]) for s in samples],
        "headroom_bits": int(headroom_bits),
        "max_weight_rel_error": max(B.err.values()),
        "gelu_exponents": sorted(B.lut_index),
        "produced_by": "export.portable.calibrate_portable",
    }
    params = PortableParams(
        N=lfgcm.N, M=lfgcm.M, slice_ch=list(lfgcm.slice_ch), mean_frac_bits=F,
        z_exp=z_exp.astype(np.int32), y_exp=y_exp.astype(np.int32), layers=B.layers,
        gelu_luts=np.stack(B.luts), thresholds=B.thresholds, meta=meta)
    params.validate()
    log.info("portable params: %d layers, %d GELU tables, max weight rel error %.2e",
             len(B.layers), len(B.luts), meta["max_weight_rel_error"])
    return params


def write_portable(params: PortableParams, out_dir: str | Path, name: str = "portable.npz") -> tuple[str, str]:
    """Write ``portable.npz`` into ``out_dir``; returns (file name, sha256) for the manifest."""
    path = Path(out_dir) / name
    return name, params.save(path)


# =========================================================================== float reference + desync harness
#
# Used by tests/test_portable.py and benchmarks/bench_portable.py: the float (reference)
# entropy path, run in torch, with optional perturbation of every float output of the
# entropy networks, to measure how often a decoder whose floats differ slightly from the
# encoder's desynchronises.

SymbolFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@contextmanager
def perturbed_float_networks(lfgcm: LFGCM, rel: float, seed: int = 0) -> Iterator[None]:
    """Multiply every output element of the hyper decoder / context / entropy-parameter
    convolutions by ``1 + rel * (+-1)`` (random sign) while the context is active.

    ``rel = 2**-10`` is about one float16 ulp, ``2**-23`` one float32 ulp: the size of the
    differences between two float backends (fp16 kernels, other summation orders).
    """
    gen = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, output.shape, generator=gen).to(output.dtype) * 2 - 1
        return output * (1 + rel * sign)

    handles = [m.register_forward_hook(hook) for m in _float_modules(lfgcm).values()] if rel else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def float_slice_loop(lfgcm: LFGCM, z_hat: torch.Tensor, symbols_fn: SymbolFn, y: torch.Tensor | None = None,
                     scale_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The reference (float) entropy path: hyper decoder + slices x (anchor, non-anchor).

    ``symbols_fn(indexes, means, y_half)`` returns the integer symbols of one half (squeezed
    maps of one half of ``y``; None on the decoder side, where ``y`` is None). Returns
    y_hat and the concatenated symbols/indexes (int32, stream order).
    """
    table = get_scale_table() if scale_table is None else torch.as_tensor(scale_table, dtype=torch.float32)
    hyper_params = lfgcm.hyper_dec(z_hat)
    syms: list[torch.Tensor] = []
    idxs: list[torch.Tensor] = []
    slices: list[torch.Tensor] = []

    def half(params: torch.Tensor, sq: Callable, unsq: Callable, y_sl: torch.Tensor | None) -> torch.Tensor:
        scales, means = params.chunk(2, 1)
        means_sq = sq(means)
        idx = build_indexes(sq(scales), table)
        s = symbols_fn(idx, means_sq, None if y_sl is None else sq(y_sl)).to(torch.float32).reshape(idx.shape)
        syms.append(s.reshape(-1).to(torch.int32))
        idxs.append(idx.reshape(-1))
        return unsq(s + means_sq)

    for i in range(lfgcm.slice_num):
        a, c = lfgcm.slice_start[i], lfgcm.slice_ch[i]
        y_sl = None if y is None else y[:, a:a + c]
        params_a, cctx = lfgcm.anchor_params(i, hyper_params, torch.cat(slices, 1) if i else None)
        anchor = half(params_a, ckbd_anchor_squeeze, ckbd_anchor_unsqueeze, y_sl)
        params_n = lfgcm.nonanchor_params(i, anchor, hyper_params, cctx)
        slices.append(anchor + half(params_n, ckbd_nonanchor_squeeze, ckbd_nonanchor_unsqueeze, y_sl))
    return {"y_hat": torch.cat(slices, 1), "symbols": torch.cat(syms), "indexes": torch.cat(idxs)}


def round_symbols(idx: torch.Tensor, means: torch.Tensor, y_half: torch.Tensor | None) -> torch.Tensor:
    """symbols_fn of the encoder: round_half_even(y - mu) in float32 (compressai)."""
    if y_half is None:
        raise ValueError("the encoder needs y")
    return torch.round(y_half - means)


@torch.no_grad()
def reference_encode(lfgcm: LFGCM, y: torch.Tensor, z_hat: torch.Tensor,
                     scale_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Float reference encoder: symbols, indexes and y_hat of the official loop."""
    return float_slice_loop(lfgcm, z_hat, round_symbols, y, scale_table)


@torch.no_grad()
def reference_desync(lfgcm: LFGCM, y: torch.Tensor, z_hat: torch.Tensor, tables: Any, fmt: str = "compat",
                     rel: float = 2.0 ** -10, seed: int = 0) -> dict[str, Any]:
    """Encode with the float model, decode with the perturbed float model; report desync.

    Returns ``{"desync": bool, "error": str | None, "symbols": n, "symbol_mismatches": k,
    "index_mismatches": j}``; a desync is a decoder error or any decoded symbol that differs.
    """
    from runtime.entropy_coding import encode_with_indexes
    from runtime.portable import _index_decoder

    enc = reference_encode(lfgcm, y, z_hat)
    sym = enc["symbols"].numpy()
    idx = enc["indexes"].numpy()
    stream = encode_with_indexes(sym, idx, tables, fmt)
    dec = _index_decoder(stream, tables, fmt)
    got_idx: list[np.ndarray] = []

    def read(indexes: torch.Tensor, means: torch.Tensor, y_half: torch.Tensor | None) -> torch.Tensor:
        flat = np.ascontiguousarray(indexes.reshape(-1).numpy(), np.int32)
        got_idx.append(flat)
        return torch.from_numpy(np.asarray(dec.decode(flat)).astype(np.int64))

    error = None
    try:
        with perturbed_float_networks(lfgcm, rel, seed):
            out = float_slice_loop(lfgcm, z_hat, read)
        dec.finish()
        dsym = out["symbols"].numpy()
    except ValueError as exc:
        error, dsym = str(exc), None
    dec_idx = np.concatenate(got_idx) if got_idx else np.zeros(0, np.int32)
    n = min(dec_idx.size, idx.size)
    n_idx = int((dec_idx[:n] != idx[:n]).sum())
    n_sym = int((dsym != sym).sum()) if dsym is not None else -1
    return {"desync": error is not None or n_sym != 0, "error": error, "symbols": int(sym.size),
            "symbol_mismatches": n_sym, "index_mismatches": n_idx}
