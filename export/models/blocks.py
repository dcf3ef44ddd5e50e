"""Building blocks shared by the SD 2.1 UNet and the DiffEIC control module (ldm layout).

This module owns the layers of ``ldm/modules/diffusionmodules/openaimodel.py`` and
``ldm/modules/attention.py`` as the official DiffEIC code uses them, re-written for
inference and export: the sinusoidal timestep embedding, GroupNorm computed in float32,
``ResBlock``, ``Downsample``/``Upsample``, ``SpatialTransformer`` (self-attention,
cross-attention, GEGLU feed-forward) and ``TimestepEmbedSequential``. Attribute names
match the official ones so the official state dicts load without renaming.

Attention is written as explicit ``matmul`` + ``softmax`` (the official "softmax"
path, scale applied after ``q @ k^T``) rather than a fused kernel, because it exports
to ONNX opset 18 without custom ops and reproduces the reference to float32 noise.

Cross-attention over a constant context (DiffEIC only ever uses the empty prompt) can
be folded: ``CrossAttention.fold_context`` caches ``K`` and ``V`` so the forward no
longer needs the context nor the ``to_k``/``to_v`` weights.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]


def find_denominator(number: int, start: int) -> int:
    """Largest divisor of ``number`` that is ``<= start`` (official ``find_denominator``)."""
    if start >= number:
        return number
    while start > 0:
        if number % start == 0:
            return start
        start -= 1
    raise ValueError(f"find_denominator({number}, {start}): start must be positive")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]`` with ``f_k = exp(-ln(max_period) k / half)``.

    ``timesteps`` is 1-D (one value per batch item, may be fractional); returns (N, dim) float32.
    """
    half = dim // 2
    # Same op order as the reference: exp(-ln(P) * arange / half), computed in float32.
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 (ldm ``GroupNorm32``/``GroupNorm_leq32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def unet_norm(channels: int) -> nn.Module:
    """The base UNet's ResBlock/out norm: 32 groups, eps 1e-5 (ldm ``normalization``)."""
    return GroupNorm32(32, channels, eps=1e-5)


def control_norm(channels: int) -> nn.Module:
    """The control module's ResBlock norm: ``find_denominator(C, 32)`` groups, eps 1e-5
    (DiffEIC ``GroupNorm_leq32``); the control widths (e.g. 64 = 0.2*320) need fewer groups."""
    return GroupNorm32(find_denominator(channels, 32), channels, eps=1e-5)


def transformer_norm(channels: int) -> nn.Module:
    """SpatialTransformer input norm: ``find_denominator(C, 32)`` groups, eps 1e-6
    (DiffEIC's patched ``ldm.modules.attention.Normalize``)."""
    return GroupNorm32(find_denominator(channels, 32), channels, eps=1e-6)


class TimestepBlock(nn.Module):
    """Marker base class: ``forward(x, emb)`` takes the timestep embedding."""


class ResBlock(TimestepBlock):
    """ldm ResBlock (no scale-shift norm, no up/down): GN-SiLU-conv, + emb, GN-SiLU-conv, + skip."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: Optional[int] = None,
        norm: NormFactory = unet_norm,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        # Index layout (in_layers.0/2, emb_layers.1, out_layers.0/3) matches the checkpoint,
        # including the Identity standing where the official Dropout sits.
        self.in_layers = nn.Sequential(
            norm(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(
            norm(self.out_channels), nn.SiLU(), nn.Identity(),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if self.out_channels == channels else nn.Conv2d(channels, self.out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with padding 1 (ldm ``Downsample`` with ``use_conv=True``)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (ldm ``Upsample`` with ``use_conv=True``)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None (ldm ``CrossAttention``)."""

    def __init__(self, query_dim: int, context_dim: Optional[int], heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k: Optional[nn.Linear] = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v: Optional[nn.Linear] = nn.Linear(context_dim or query_dim, inner, bias=False)
        # to_out.1 is the official Dropout; an Identity keeps the index of to_out.0.
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())
        self.k_cache: Optional[torch.Tensor]
        self.v_cache: Optional[torch.Tensor]
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    @property
    def folded(self) -> bool:
        return self.k_cache is not None

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        # (B, N, h*d) -> (B, h, N, d)
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)

    @torch.no_grad()
    def fold_context(self, context: torch.Tensor) -> None:
        """Cache K/V of a fixed ``context`` (batch 1, broadcast over any batch) and drop to_k/to_v."""
        if self.to_k is None or self.to_v is None:
            raise RuntimeError("fold_context: this attention is already folded")
        if context.shape[0] != 1:
            raise ValueError(f"fold_context expects a batch-1 context, got shape {tuple(context.shape)}")
        self.k_cache = self._split(self.to_k(context)).contiguous()
        self.v_cache = self._split(self.to_v(context)).contiguous()
        self.to_k = None
        self.to_v = None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self._split(self.to_q(x))
        if self.k_cache is not None and self.v_cache is not None:
            k, v = self.k_cache, self.v_cache
        else:
            assert self.to_k is not None and self.to_v is not None
            src = x if context is None else context
            k, v = self._split(self.to_k(src)), self._split(self.to_v(src))
        # Matches the reference op order: (q @ k^T) * scale, softmax, @ v. A batch-1 cached
        # K/V broadcasts over the query batch in matmul.
        sim = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        out = torch.matmul(sim.softmax(dim=-1), v)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    """``x * gelu(gate)`` with exact (erf) GELU, both halves from one projection."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention, GEGLU FFN, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """ldm SpatialTransformer: norm, proj_in (1x1 conv or linear), blocks, proj_out, + input."""

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        depth: int = 1,
        use_linear: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = transformer_norm(in_channels)
        if use_linear:
            if inner != in_channels:
                # The official linear proj_out is nn.Linear(in_channels, inner) applied to
                # inner-wide features: it only runs when both widths agree.
                raise ValueError(
                    f"SpatialTransformer(use_linear=True) needs heads*dim_head == channels, got "
                    f"{heads}*{dim_head} != {in_channels} (the official module cannot run this either)"
                )
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that feeds ``emb`` to ResBlocks and ``context`` to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def fold_module_context(module: nn.Module, context: torch.Tensor) -> int:
    """Fold ``context`` into every cross-attention (``attn2``) under ``module``; returns the count."""
    n = 0
    for sub in module.modules():
        if isinstance(sub, BasicTransformerBlock):
            sub.attn2.fold_context(context)
            n += 1
    return n
