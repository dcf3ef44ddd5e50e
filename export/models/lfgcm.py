"""The LFGCM of DiffEIC (official ``model/lfgcm.py``) and its symbol-level reference path.

This module owns:

* the LFGCM network (encoder, hyper encoder/decoder, content decoder ``decoder``, ``f_c``,
  the per-slice checkerboard/channel context heads) with the official submodule names,
* a parameter-compatible EntropyBottleneck (compressai 1.2.4 names: ``quantiles``,
  ``_matrix{i}``, ``_bias{i}``, ``_factor{i}``, ``target``, ``likelihood_lower_bound``)
  with ``_logits_cumulative`` and the medians; its CDF tables are built by
  :mod:`export.tables`,
* the reference symbol path in torch: ``compress_symbols`` produces exactly the integer
  symbols and CDF indexes that the official ``compress`` hands to the rANS coder, and
  ``decompress_loop`` mirrors the official ``decompress`` with a pluggable symbol reader
  (the ONNX runtime reproduces this loop),
* small ``nn.Module`` wrappers around the per-slice heads, with plain tensor inputs, for
  ONNX export.

The GaussianConditional of the official model holds no learned parameters, only the
scale table and its CDFs (rebuilt by ``update(force=True)``), so it is not a submodule
here: the scale table is passed in explicitly (see :func:`export.tables.get_scale_table`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from export.checkpoints import load_into
from export.models.layers import (
    SFT,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    ResidualBottleneck,
    SFTResblk,
    ckbd_anchor_squeeze,
    ckbd_anchor_unsqueeze,
    ckbd_nonanchor_squeeze,
    ckbd_nonanchor_unsqueeze,
    conv,
    conv1x1,
    conv3x3,
    deconv,
)

log = logging.getLogger(__name__)

__all__ = [
    "LFGCM", "EntropyBottleneck", "AnchorParams", "NonAnchorParams",
    "LFGCM_CKPT_IGNORE", "SCALE_BOUND", "get_scale_table", "build_indexes", "round_half_even",
    "lfgcm_kwargs", "load_lfgcm",
]

# Checkpoint keys the LFGCM here deliberately does not hold: compressai's CDF buffers
# (empty in training checkpoints, rebuilt from the parameters by export.tables) and the
# parameter-free GaussianConditional.
LFGCM_CKPT_IGNORE: tuple[str, ...] = (
    "entropy_bottleneck._offset",
    "entropy_bottleneck._quantized_cdf",
    "entropy_bottleneck._cdf_length",
    "gaussian_conditional.",
)

# GaussianConditional(None): scale_bound 0.11, stored as a float32 buffer.
SCALE_BOUND = 0.11


def get_scale_table(min_scale: float = 0.11, max_scale: float = 256.0, levels: int = 64) -> torch.Tensor:
    """The official (utils/func.py) scale table: exp(linspace(ln min, ln max, levels)) in float32."""
    return torch.exp(torch.linspace(math.log(min_scale), math.log(max_scale), levels))


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """torch.round (half to even) in the input dtype, as compressai's quantize(..., 'symbols')."""
    return torch.round(x)


def build_indexes(scales: torch.Tensor, scale_table: torch.Tensor) -> torch.Tensor:
    """compressai 1.2.4 ``GaussianConditional.build_indexes``: int32 CDF indexes.

    ``s' = max(scale, 0.11)`` then ``index = (T-1) - #{k < T-1 : s' <= table[k]}``, all in
    float32 (the comparisons must not be done in float64).
    """
    table = scale_table.to(torch.float32)
    s = torch.clamp_min(scales.to(torch.float32), torch.tensor(SCALE_BOUND, dtype=torch.float32))
    idx = torch.full(s.shape, table.numel() - 1, dtype=torch.int32)
    for t in table[:-1]:
        idx -= (s <= t).to(torch.int32)
    return idx


# =========================================================================== entropy bottleneck

class _LowerBound(nn.Module):
    """Holds compressai's ``LowerBound.bound`` buffer (used only in training likelihoods)."""

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.register_buffer("bound", torch.tensor([float(bound)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.max(x, self.bound)


class EntropyBottleneck(nn.Module):
    """Parameters and density of compressai 1.2.4's ``EntropyBottleneck`` (no coder).

    The CDF tables are built from these parameters by
    :func:`export.tables.build_bottleneck_tables`, which mirrors ``update(force=True)``.
    """

    def __init__(self, channels: int, tail_mass: float = 1e-9, init_scale: float = 10.0,
                 filters: Sequence[int] = (3, 3, 3, 3), likelihood_bound: float = 1e-9) -> None:
        super().__init__()
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        self.init_scale = float(init_scale)
        self.tail_mass = float(tail_mass)
        dims = (1,) + self.filters + (1,)
        scale = self.init_scale ** (1 / (len(self.filters) + 1))
        for i in range(len(self.filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.register_parameter(
                f"_matrix{i:d}", nn.Parameter(torch.full((self.channels, dims[i + 1], dims[i]), init)))
            self.register_parameter(
                f"_bias{i:d}", nn.Parameter(torch.rand(self.channels, dims[i + 1], 1) - 0.5))
            if i < len(self.filters):
                self.register_parameter(
                    f"_factor{i:d}", nn.Parameter(torch.zeros(self.channels, dims[i + 1], 1)))
        self.quantiles = nn.Parameter(
            torch.tensor([-self.init_scale, 0.0, self.init_scale]).repeat(self.channels, 1, 1))
        target = math.log(2 / self.tail_mass - 1)
        self.register_buffer("target", torch.tensor([-target, 0.0, target]))
        self.likelihood_lower_bound = _LowerBound(likelihood_bound)

    def _logits_cumulative(self, inputs: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
        """Cumulative logits F(x) for inputs of shape (C, 1, L), in compressai's op order.

        The exact sequence of torch float32 ops (softplus, batched matmul, in-place adds,
        tanh) matters: the CDF tables are only bit-exact with these kernels.
        """
        logits = inputs
        for i in range(len(self.filters) + 1):
            matrix = getattr(self, f"_matrix{i:d}")
            bias = getattr(self, f"_bias{i:d}")
            if stop_gradient:
                matrix, bias = matrix.detach(), bias.detach()
            logits = torch.matmul(F.softplus(matrix), logits)
            logits += bias
            if i < len(self.filters):
                factor = getattr(self, f"_factor{i:d}")
                if stop_gradient:
                    factor = factor.detach()
                logits += torch.tanh(factor) * torch.tanh(logits)
        return logits

    def medians(self) -> torch.Tensor:
        """Per-channel medians ``quantiles[:, 0, 1]``, shape (C,)."""
        return self.quantiles[:, 0, 1].detach()

    def _get_medians(self) -> torch.Tensor:
        """compressai's layout of the medians, shape (C, 1, 1)."""
        return self.quantiles[:, :, 1:2]


# =========================================================================== sub-networks

def _sft_stem(in_nc: int, out_nc: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_nc, out_nc, stride=stride), nn.GELU(), conv1x1(out_nc, out_nc))


def _sft_fuse(in_nc: int, prior_nc: int) -> nn.Sequential:
    return nn.Sequential(
        conv3x3(in_nc, prior_nc * 4), nn.GELU(),
        conv3x3(prior_nc * 4, prior_nc * 2), nn.GELU(),
        conv3x3(prior_nc * 2, prior_nc),
    )


def _down_stage(in_nc: int, out_nc: int) -> list[nn.Module]:
    return [ResidualBlockWithStride(in_nc, out_nc)] + [ResidualBottleneck(out_nc) for _ in range(3)]


class Encoder(nn.Module):
    """Analysis transform g_a: image (1x) + VAE latent z_g (1/8) -> y (1/16)."""

    def __init__(self, in_nc: int, mid_nc: Sequence[int], out_nc: int, prior_nc: int, sft_ks: int) -> None:
        super().__init__()
        self.sft_1_8 = _sft_stem(4, prior_nc)
        self.sft_1_16 = _sft_stem(prior_nc, prior_nc, stride=2)
        self.sft_1_16_2 = _sft_stem(prior_nc, prior_nc)
        self.g_a1 = nn.Sequential(
            *_down_stage(in_nc, mid_nc[0]), *_down_stage(mid_nc[0], mid_nc[1]), *_down_stage(mid_nc[1], mid_nc[2]))
        self.g_a1_ref = SFT(mid_nc[2], prior_nc, ks=sft_ks)
        self.g_a2 = nn.Sequential(*_down_stage(mid_nc[2], mid_nc[3]))
        self.g_a2_ref = SFT(mid_nc[3], prior_nc, ks=sft_ks)
        self.g_a3 = conv3x3(mid_nc[3], mid_nc[3])
        self.g_a4 = SFTResblk(mid_nc[3], prior_nc, ks=sft_ks)
        self.g_a5 = SFTResblk(mid_nc[3], prior_nc, ks=sft_ks)
        self.g_a6 = conv3x3(mid_nc[3], out_nc)

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        f = self.sft_1_8(feature)
        x = self.g_a1_ref(self.g_a1(x), f)
        f = self.sft_1_16(f)
        x = self.g_a2_ref(self.g_a2(x), f)
        f = self.sft_1_16_2(f)
        x = self.g_a3(x)
        x = self.g_a4(x, f)
        x = self.g_a5(x, f)
        return self.g_a6(x)


class Decoder(nn.Module):
    """Content decoder g_s: (y_hat, f_c(z_hat)) at 1/16 -> content latent c (1/8)."""

    def __init__(self, N: int, M: int, out_nc: int, prior_nc: int, sft_ks: int) -> None:
        super().__init__()
        self.sft_feature_gs1 = _sft_fuse(M + N // 4, prior_nc)
        self.sft_feature_gs2 = _sft_stem(prior_nc, prior_nc)
        self.sft_feature_gs3 = nn.Sequential(deconv(prior_nc, prior_nc, 3), nn.GELU(), conv1x1(prior_nc, prior_nc))
        self.g_s0 = SFTResblk(M, prior_nc, ks=sft_ks)
        self.g_s1 = SFTResblk(M, prior_nc, ks=sft_ks)
        self.g_s2 = nn.Sequential(conv3x3(M, N), *[ResidualBottleneck(N) for _ in range(3)])
        self.g_s2_ref = SFT(N, prior_nc, ks=sft_ks)
        self.g_s3 = nn.Sequential(ResidualBlockUpsample(N, N), *[ResidualBottleneck(N) for _ in range(3)])
        self.g_s3_ref = SFT(N, prior_nc, ks=sft_ks)
        self.g_s4 = conv3x3(N, out_nc)

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        f = self.sft_feature_gs1(torch.cat([ref, x], dim=1))
        x = self.g_s0(x, f)
        x = self.g_s1(x, f)
        f = self.sft_feature_gs2(f)
        x = self.g_s2_ref(self.g_s2(x), f)
        f = self.sft_feature_gs3(f)
        x = self.g_s3_ref(self.g_s3(x), f)
        return self.g_s4(x)


class HyperEncoder(nn.Module):
    """Hyper analysis h_a: (y at 1/16, z_g at 1/8) -> z (1/64)."""

    def __init__(self, N: int, M: int, prior_nc: int, sft_ks: int) -> None:
        super().__init__()
        self.sft_feature = _sft_stem(4, prior_nc, stride=2)
        self.sft_feature_h1 = _sft_fuse(M + prior_nc, prior_nc)
        self.sft_feature_h2 = nn.Sequential(conv(prior_nc, prior_nc, 3), nn.GELU(), conv(prior_nc, prior_nc, 1, 1))
        self.sft_feature_h3 = nn.Sequential(conv(prior_nc, prior_nc, 3), nn.GELU(), conv(prior_nc, prior_nc, 1, 1))
        self.h_a0 = conv3x3(M, N)
        self.h_a1 = SFT(N, prior_nc, ks=sft_ks)
        self.h_a2 = nn.GELU()
        self.h_a3 = conv(N, N)
        self.h_a4 = SFT(N, prior_nc, ks=sft_ks)
        self.h_a5 = nn.GELU()
        self.h_a6 = conv(N, N)
        self.h_a7 = SFTResblk(N, prior_nc, ks=sft_ks)
        self.h_a8 = SFTResblk(N, prior_nc, ks=sft_ks)
        self.h_a9 = conv1x1(N, N)

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        f = self.sft_feature(feature)
        f = self.sft_feature_h1(torch.cat([f, x], dim=1))
        x = self.h_a2(self.h_a1(self.h_a0(x), f))
        f = self.sft_feature_h2(f)
        x = self.h_a5(self.h_a4(self.h_a3(x), f))
        f = self.sft_feature_h3(f)
        x = self.h_a6(x)
        x = self.h_a7(x, f)
        x = self.h_a8(x, f)
        return self.h_a9(x)


class HyperDecoder(nn.Module):
    """Hyper synthesis h_s: z_hat (1/64) -> hyper_params (2M channels, 1/16)."""

    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        self.hyper_dec = nn.Sequential(
            deconv(N, M), nn.GELU(),
            deconv(M, M * 3 // 2), nn.GELU(),
            deconv(M * 3 // 2, M * 2, kernel_size=3, stride=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hyper_dec(x)


class ChannelContextEX(nn.Module):
    """Channel context over the already decoded slices (hidden widths 224/128 are fixed)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # "fushion" (sic) is the official parameter name.
        self.fushion = nn.Sequential(
            nn.Conv2d(in_dim, 224, kernel_size=5, stride=1, padding=2), nn.GELU(),
            nn.Conv2d(224, 128, kernel_size=5, stride=1, padding=2), nn.GELU(),
            nn.Conv2d(128, out_dim, kernel_size=5, stride=1, padding=2),
        )

    def forward(self, channel_params: torch.Tensor) -> torch.Tensor:
        return self.fushion(channel_params)


class EntropyParametersEX(nn.Module):
    """1x1 MLP producing (scales, means) of one slice."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fusion = nn.Sequential(
            nn.Conv2d(in_dim, out_dim * 5 // 3, 1), nn.GELU(),
            nn.Conv2d(out_dim * 5 // 3, out_dim * 4 // 3, 1), nn.GELU(),
            nn.Conv2d(out_dim * 4 // 3, out_dim, 1),
        )

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        return self.fusion(params)


# =========================================================================== LFGCM

SymbolReader = Callable[[torch.Tensor], torch.Tensor]


class LFGCM(nn.Module):
    """DiffEIC's latent-feature-guided compression module (inference parts).

    Constructor arguments are the official YAML ``preprocess_config.params``.
    """

    def __init__(self, in_nc: int, out_nc: int, enc_mid: Sequence[int], N: int, M: int, prior_nc: int,
                 sft_ks: int, slice_num: int, slice_ch: Sequence[int]) -> None:
        super().__init__()
        slice_ch = [int(c) for c in slice_ch]
        if len(slice_ch) != slice_num or sum(slice_ch) != M:
            raise ValueError(f"slice_ch {slice_ch} must have slice_num={slice_num} entries summing to M={M}")
        self.slice_num = int(slice_num)
        self.slice_ch = slice_ch
        self.slice_start = [sum(slice_ch[:i]) for i in range(slice_num)]
        self.N, self.M = int(N), int(M)

        self.encoder = Encoder(in_nc, enc_mid, M, prior_nc, sft_ks)
        self.hyper_enc = HyperEncoder(N, M, prior_nc, sft_ks)
        self.hyper_dec = HyperDecoder(N, M)
        self.decoder = Decoder(N, M, out_nc, prior_nc, sft_ks)
        self.f_c = nn.Sequential(
            deconv(N, N // 2), nn.GELU(),
            deconv(N // 2, N // 4), nn.GELU(),
            deconv(N // 4, N // 4, kernel_size=3, stride=1),
        )
        self.local_context = nn.ModuleList(
            nn.Conv2d(c, c * 2, kernel_size=5, stride=1, padding=2) for c in slice_ch)
        # Index 0 has no channel context; ModuleList keeps the None so indices match.
        self.channel_context = nn.ModuleList(
            ChannelContextEX(sum(slice_ch[:i]), slice_ch[i] * 2) if i else None for i in range(slice_num))
        self.entropy_parameters_anchor = nn.ModuleList(
            EntropyParametersEX(M * 2 + (slice_ch[i] * 2 if i else 0), slice_ch[i] * 2)
            for i in range(slice_num))
        self.entropy_parameters_nonanchor = nn.ModuleList(
            EntropyParametersEX(M * 2 + slice_ch[i] * (4 if i else 2), slice_ch[i] * 2)
            for i in range(slice_num))
        self.entropy_bottleneck = EntropyBottleneck(N)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: Any) -> "LFGCM":
        """Build from a :class:`export.config.DiffEICConfig` (or the bare params mapping)."""
        return cls(**lfgcm_kwargs(cfg))

    # ------------------------------------------------------------------ network pieces

    def analysis(self, x01: torch.Tensor, z_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image in [0,1], VAE latent z_g) -> (y, z)."""
        y = self.encoder(x01, z_g)
        z = self.hyper_enc(y, z_g)
        return y, z

    def hyper(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_hat -> (hyper_params, f_c): the two networks fed by the decoded hyper-latent."""
        return self.hyper_dec(z_hat), self.f_c(z_hat)

    def content_decoder(self, y_hat: torch.Tensor, f_c: torch.Tensor) -> torch.Tensor:
        """Official ``decoder(y_hat, f_c)``: the content latent c (the control hint)."""
        return self.decoder(y_hat, f_c)

    def anchor_params(self, i: int, hyper_params: torch.Tensor,
                      y_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Entropy parameters of the anchors of slice ``i`` (scales first, then means).

        ``y_prev`` is the concatenation of the dequantized slices ``< i`` (None for i = 0).
        Returns ``(params_anchor, channel_ctx)``; channel_ctx is None for i = 0.
        """
        if i == 0:
            return self.entropy_parameters_anchor[0](hyper_params), None
        if y_prev is None:
            raise ValueError(f"slice {i} needs the decoded slices 0..{i - 1}")
        channel_ctx = self.channel_context[i](y_prev)
        return self.entropy_parameters_anchor[i](torch.cat([channel_ctx, hyper_params], dim=1)), channel_ctx

    def nonanchor_params(self, i: int, anchor_hat: torch.Tensor, hyper_params: torch.Tensor,
                         channel_ctx: torch.Tensor | None) -> torch.Tensor:
        """Entropy parameters of the non-anchors of slice ``i`` (scales first, then means).

        ``anchor_hat`` is the dequantized anchor half with zeros at non-anchor positions.
        """
        local_ctx = self.local_context[i](anchor_hat)
        if i == 0:
            return self.entropy_parameters_nonanchor[0](torch.cat([local_ctx, hyper_params], dim=1))
        if channel_ctx is None:
            raise ValueError(f"slice {i} needs its channel context")
        return self.entropy_parameters_nonanchor[i](torch.cat([local_ctx, channel_ctx, hyper_params], dim=1))

    # ------------------------------------------------------------------ symbol path

    def _z_hat(self, z_symbols: torch.Tensor, medians: torch.Tensor) -> torch.Tensor:
        med = medians.to(torch.float32).view(1, -1, 1, 1)
        return z_symbols.to(torch.float32) + med

    @torch.no_grad()
    def compress_symbols(self, x01: torch.Tensor, z_g: torch.Tensor, medians: torch.Tensor | None = None,
                         scale_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reference of the official ``compress`` (and ``decompress``) down to the symbols.

        Returns ``y, z, z_symbols (int32), z_hat, hyper_params, params_anchor_i,
        params_nonanchor_i, y_symbols (int32, stream order), y_indexes (int32), y_hat,
        f_c, c_latent``. ``medians`` default to the EntropyBottleneck's quantiles and
        ``scale_table`` to :func:`get_scale_table`.
        """
        if x01.shape[0] != 1:
            raise ValueError("compress_symbols codes one image at a time (batch 1), as the official code")
        if medians is None:
            medians = self.entropy_bottleneck.medians()
        y, z = self.analysis(x01, z_g)
        med = medians.to(torch.float32).view(1, -1, 1, 1)
        z_symbols = round_half_even(z - med).to(torch.int32)
        z_hat = self._z_hat(z_symbols, medians)

        def quantize(values: torch.Tensor, indexes: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
            return round_half_even(values - means)

        out = self._slice_loop(z_hat, scale_table, y=y, quantize=quantize)
        out.update(y=y, z=z, z_symbols=z_symbols)
        return out

    @torch.no_grad()
    def decompress_loop(self, z_hat: torch.Tensor, read_symbols: SymbolReader,
                        scale_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mirror of the official ``decompress`` after the hyper-latent is decoded.

        ``read_symbols(indexes)`` receives the int32 CDF indexes of one half-slice (a flat
        tensor, 20 calls in stream order) and must return the decoded integer symbols of
        that length (e.g. ``RansDecoder.decode_stream``).
        """
        def quantize(values: torch.Tensor | None, indexes: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
            sym = torch.as_tensor(read_symbols(indexes.reshape(-1)))
            if sym.numel() != indexes.numel():
                raise ValueError(f"symbol reader returned {sym.numel()} symbols for {indexes.numel()} indexes")
            return sym.reshape(indexes.shape).to(torch.float32)

        return self._slice_loop(z_hat, scale_table, y=None, quantize=quantize)

    @torch.no_grad()
    def decompress_from_symbols(self, z_symbols: torch.Tensor, y_symbols: torch.Tensor,
                                medians: torch.Tensor | None = None,
                                scale_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Decode from the integer symbols (as an rANS decoder would produce them)."""
        if medians is None:
            medians = self.entropy_bottleneck.medians()
        flat = torch.as_tensor(y_symbols).reshape(-1)
        pos = [0]

        def reader(indexes: torch.Tensor) -> torch.Tensor:
            n = indexes.numel()
            if pos[0] + n > flat.numel():
                raise ValueError("y_symbols is shorter than the stream needs")
            chunk = flat[pos[0]:pos[0] + n]
            pos[0] += n
            return chunk

        z_hat = self._z_hat(torch.as_tensor(z_symbols), medians)
        out = self.decompress_loop(z_hat, reader, scale_table)
        if pos[0] != flat.numel():
            raise ValueError(f"y_symbols has {flat.numel() - pos[0]} symbols left over")
        out["z_symbols"] = torch.as_tensor(z_symbols).to(torch.int32)
        return out

    def _slice_loop(self, z_hat: torch.Tensor, scale_table: torch.Tensor | None, y: torch.Tensor | None,
                    quantize: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        # One loop for both directions so encoder and decoder cannot drift apart. For each
        # half-slice: squeeze scales/means to stream order, build CDF indexes, obtain the
        # integer symbols (round(y - mu) when encoding, the coder's output when decoding),
        # dequantize as float32(s) + mu and unsqueeze back with zeros elsewhere.
        table = get_scale_table() if scale_table is None else torch.as_tensor(scale_table, dtype=torch.float32)
        hyper_params, f_c = self.hyper(z_hat)
        out: dict[str, torch.Tensor] = {"z_hat": z_hat, "hyper_params": hyper_params, "f_c": f_c}
        symbols: list[torch.Tensor] = []
        indexes: list[torch.Tensor] = []
        y_hat_slices: list[torch.Tensor] = []

        def code_half(params: torch.Tensor, values: torch.Tensor | None,
                      squeeze: Callable[[torch.Tensor], torch.Tensor],
                      unsqueeze: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            scales, means = params.chunk(2, 1)
            scales_sq, means_sq = squeeze(scales), squeeze(means)
            idx = build_indexes(scales_sq, table)
            sym = quantize(None if values is None else squeeze(values), idx, means_sq)
            symbols.append(sym.reshape(-1).to(torch.int32))
            indexes.append(idx.reshape(-1))
            return unsqueeze(sym + means_sq)

        for i in range(self.slice_num):
            a, c = self.slice_start[i], self.slice_ch[i]
            y_slice = None if y is None else y[:, a:a + c]
            y_prev = torch.cat(y_hat_slices, dim=1) if i else None
            params_a, channel_ctx = self.anchor_params(i, hyper_params, y_prev)
            anchor_hat = code_half(params_a, y_slice, ckbd_anchor_squeeze, ckbd_anchor_unsqueeze)
            params_n = self.nonanchor_params(i, anchor_hat, hyper_params, channel_ctx)
            nonanchor_hat = code_half(params_n, y_slice, ckbd_nonanchor_squeeze, ckbd_nonanchor_unsqueeze)
            y_hat_slices.append(anchor_hat + nonanchor_hat)
            out[f"params_anchor_{i}"] = params_a
            out[f"params_nonanchor_{i}"] = params_n

        y_hat = torch.cat(y_hat_slices, dim=1)
        out["y_hat"] = y_hat
        out["y_symbols"] = torch.cat(symbols)
        out["y_indexes"] = torch.cat(indexes)
        out["c_latent"] = self.content_decoder(y_hat, f_c)
        return out


# =========================================================================== ONNX wrappers

class AnchorParams(nn.Module):
    """Slice ``i`` anchor head with plain tensor inputs.

    i = 0: ``forward(hyper_params) -> params_anchor``.
    i >= 1: ``forward(hyper_params, y_prev) -> (params_anchor, channel_ctx)``.
    """

    def __init__(self, lfgcm: LFGCM, i: int) -> None:
        super().__init__()
        self.i = int(i)
        self.entropy_parameters = lfgcm.entropy_parameters_anchor[self.i]
        self.channel_context = lfgcm.channel_context[self.i] if self.i else None

    def forward(self, hyper_params: torch.Tensor, y_prev: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.channel_context is None:
            return self.entropy_parameters(hyper_params)
        if y_prev is None:
            raise ValueError(f"slice {self.i} needs y_prev")
        channel_ctx = self.channel_context(y_prev)
        return self.entropy_parameters(torch.cat([channel_ctx, hyper_params], dim=1)), channel_ctx


class NonAnchorParams(nn.Module):
    """Slice ``i`` non-anchor head with plain tensor inputs.

    i = 0: ``forward(anchor_hat, hyper_params) -> params_nonanchor``.
    i >= 1: ``forward(anchor_hat, hyper_params, channel_ctx) -> params_nonanchor``.
    """

    def __init__(self, lfgcm: LFGCM, i: int) -> None:
        super().__init__()
        self.i = int(i)
        self.local_context = lfgcm.local_context[self.i]
        self.entropy_parameters = lfgcm.entropy_parameters_nonanchor[self.i]

    def forward(self, anchor_hat: torch.Tensor, hyper_params: torch.Tensor,
                channel_ctx: torch.Tensor | None = None) -> torch.Tensor:
        local_ctx = self.local_context(anchor_hat)
        if self.i == 0:
            return self.entropy_parameters(torch.cat([local_ctx, hyper_params], dim=1))
        if channel_ctx is None:
            raise ValueError(f"slice {self.i} needs channel_ctx")
        return self.entropy_parameters(torch.cat([local_ctx, channel_ctx, hyper_params], dim=1))


# =========================================================================== loading

_KWARGS = ("in_nc", "out_nc", "enc_mid", "N", "M", "prior_nc", "sft_ks", "slice_num", "slice_ch")


def lfgcm_kwargs(cfg: Any) -> dict[str, Any]:
    """LFGCM constructor kwargs from a DiffEICConfig (``.lfgcm``) or the params mapping."""
    params: Mapping[str, Any] = getattr(cfg, "lfgcm", cfg)
    missing = [k for k in _KWARGS if k not in params]
    if missing:
        raise ValueError(f"LFGCM config lacks {missing}")
    return {k: params[k] for k in _KWARGS}


def load_lfgcm(lc_state: Mapping[str, torch.Tensor], cfg: Any, where: str = "lc.ckpt") -> LFGCM:
    """Build the LFGCM from ``cfg`` and strictly load the LFGCM part of a DiffEIC state dict.

    ``lc_state`` may be the full ``lc.ckpt`` state (``preprocess_model.*`` keys) or the
    already extracted LFGCM sub-dict. Raises CheckpointError on missing/unexpected keys or
    shape mismatches. The model is returned in eval mode, float32.
    """
    from export.checkpoints import extract

    state = extract(lc_state, "lfgcm") if any(k.startswith("preprocess_model.") for k in lc_state) else dict(lc_state)
    model = LFGCM.from_config(cfg)
    load_into(model, state, where, ignore=LFGCM_CKPT_IGNORE)
    model.eval()
    log.debug("%s: LFGCM loaded (%d parameters)", where, sum(p.numel() for p in model.parameters()))
    return model
