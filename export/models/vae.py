"""The SD KL autoencoder (ldm ``AutoencoderKL``: Encoder, Decoder, quant convs), inference only.

This module owns the VAE as DiffEIC uses it: ``encode_mode_scaled`` gives the latent
``z_g = mean * scale_factor`` fed to the LFGCM (``encode_first_stage(x).mode() *
scale_factor``), and ``decode_scaled`` is ``decode_first_stage``. Key names are those of
``first_stage_model.*`` with the prefix removed.

The VAE uses GroupNorm(32, eps 1e-6), swish written as ``x * sigmoid(x)`` (as the
reference), single-head attention in the middle, and a Downsample that pads (0,1,0,1)
before a stride-2 3x3 conv.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice with a (1x1) shortcut when the width changes; no timestep input."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
        k = k.reshape(b, c, hh * ww)  # (B, C, HW)
        w = torch.matmul(q, k) * (int(c) ** -0.5)
        w = w.softmax(dim=2)
        v = v.reshape(b, c, hh * ww)
        out = torch.matmul(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric zero pad (right/bottom by 1), then 3x3 conv with stride 2 and no padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest 2x, then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_ddconfig(dd: Mapping[str, Any]) -> None:
    if dd.get("attn_type", "vanilla") != "vanilla" or dd.get("use_linear_attn", False):
        raise ValueError("only vanilla VAE attention is supported")
    if not dd.get("resamp_with_conv", True):
        raise ValueError("resamp_with_conv=False is not supported")
    if dd.get("give_pre_end", False) or dd.get("tanh_out", False):
        raise ValueError("give_pre_end/tanh_out are not supported")


class Encoder(nn.Module):
    """ldm ``Encoder``: conv_in, down levels (res blocks [+attn], downsample), mid, norm_out, conv_out."""

    def __init__(self, dd: Mapping[str, Any]) -> None:
        super().__init__()
        _check_ddconfig(dd)
        ch, mult, nrb = int(dd["ch"]), list(dd["ch_mult"]), int(dd["num_res_blocks"])
        attn_res = set(dd["attn_resolutions"])
        self.num_res_blocks = nrb
        self.conv_in = nn.Conv2d(int(dd["in_channels"]), ch, 3, padding=1)
        res = int(dd["resolution"])
        in_mult = (1,) + tuple(mult)
        self.down = nn.ModuleList()
        block_in = ch
        for lvl, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in = ch * in_mult[lvl]
            for _ in range(nrb):
                level.block.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
                if res in attn_res:
                    level.attn.append(AttnBlock(block_in))
            if lvl != len(mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = _norm(block_in)
        z = int(dd["z_channels"])
        self.conv_out = nn.Conv2d(block_in, 2 * z if dd.get("double_z", True) else z, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl, level in enumerate(self.down):
            for i in range(self.num_res_blocks):
                h = level.block[i](h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if lvl != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """ldm ``Decoder``: conv_in, mid, up levels (res blocks [+attn], upsample), norm_out, conv_out."""

    def __init__(self, dd: Mapping[str, Any]) -> None:
        super().__init__()
        _check_ddconfig(dd)
        ch, mult, nrb = int(dd["ch"]), list(dd["ch_mult"]), int(dd["num_res_blocks"])
        attn_res = set(dd["attn_resolutions"])
        self.num_res_blocks = nrb
        block_in = ch * mult[-1]
        res = int(dd["resolution"]) // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(int(dd["z_channels"]), block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        levels: list[nn.Module] = []
        for lvl in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(nrb + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[lvl]))
                block_in = ch * mult[lvl]
                if res in attn_res:
                    level.attn.append(AttnBlock(block_in))
            if lvl != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # up[i] is level i, as in the checkpoint
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, int(dd["out_ch"]), 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for lvl in reversed(range(len(self.up))):
            level = self.up[lvl]
            for i in range(self.num_res_blocks + 1):
                h = level.block[i](h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if lvl != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD KL-f8 VAE. ``vae_params`` is ``{"embed_dim": int, "ddconfig": {...}}`` (config.vae)."""

    def __init__(self, vae_params: Mapping[str, Any], scale_factor: float) -> None:
        super().__init__()
        dd = vae_params["ddconfig"]
        if not dd.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z=True (mean and logvar)")
        embed = int(vae_params["embed_dim"])
        z = int(dd["z_channels"])
        self.embed_dim = embed
        self.scale_factor = float(scale_factor)
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed, 1)
        self.post_quant_conv = nn.Conv2d(embed, z, 1)

    def encode_moments(self, x_pm1: torch.Tensor) -> torch.Tensor:
        """``quant_conv(encoder(x))``: channels ``[:embed_dim]`` mean, the rest logvar."""
        return self.quant_conv(self.encoder(x_pm1))

    def encode_mode_scaled(self, x_pm1: torch.Tensor) -> torch.Tensor:
        """``z_g = mode() * scale_factor`` for an image in [-1, 1] (the LFGCM ``ref`` input)."""
        mean = self.encode_moments(x_pm1)[:, : self.embed_dim]
        # A Python scalar times a float32 tensor is computed in float32, i.e. this is
        # mean * float32(scale_factor), exactly as the reference.
        return mean * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``decoder(post_quant_conv(z))`` on an unscaled latent."""
        return self.decoder(self.post_quant_conv(z))

    def decode_scaled(self, z: torch.Tensor) -> torch.Tensor:
        """``decode_first_stage``: ``decode(z * (1/scale_factor))`` (multiplied, not divided,
        as the reference does; dividing rounds differently for ~22 % of the elements)."""
        return self.decode(z * (1.0 / self.scale_factor))
