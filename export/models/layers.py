"""LFGCM building blocks (official ``model/layers``) and the checkerboard helpers.

This module owns the convolution factories, the residual blocks, the spatial feature
transform (SFT) layers and the checkerboard (ckbd) mask / squeeze utilities that the
LFGCM of DiffEIC is assembled from. Submodule and parameter names follow the official
code (which itself follows compressai / ELIC), so official state dicts load unchanged.
Only the math of the official layers is reproduced here; no compressai import.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "conv", "deconv", "conv3x3", "conv1x1", "subpel_conv1x1",
    "ResidualBlockWithStride", "ResidualBlockUpsample", "ResidualBottleneck",
    "SFT", "SFTResblk",
    "anchor_mask", "nonanchor_mask", "ckbd_anchor", "ckbd_nonanchor",
    "ckbd_anchor_squeeze", "ckbd_nonanchor_squeeze",
    "ckbd_anchor_unsqueeze", "ckbd_nonanchor_unsqueeze",
]


# --------------------------------------------------------------------------- convs

def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 (compressai's ``conv3x3``)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no padding."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride)


def conv(in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> nn.Conv2d:
    """Strided 'same'-padded convolution (default: 5x5, stride 2)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                     padding=kernel_size // 2)


def deconv(in_channels: int, out_channels: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """Transposed convolution that exactly multiplies the spatial size by ``stride``."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                              output_padding=stride - 1, padding=kernel_size // 2)


def subpel_conv1x1(in_ch: int, out_ch: int, r: int = 1) -> nn.Sequential:
    """1x1 convolution to ``out_ch * r^2`` channels followed by a pixel shuffle by ``r``."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch * r ** 2, kernel_size=1, padding=0), nn.PixelShuffle(r))


# --------------------------------------------------------------------------- residual blocks

class ResidualBlockWithStride(nn.Module):
    """Two 3x3 convs (the first strided) plus a strided 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.leaky_relu = nn.LeakyReLU()  # default slope 0.01, as in the official block
        self.conv2 = conv3x3(out_ch, out_ch)
        self.leaky_relu2 = nn.LeakyReLU(negative_slope=0.1)
        self.downsample = conv1x1(in_ch, out_ch, stride=stride) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaky_relu2(self.conv2(self.leaky_relu(self.conv1(x))))
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class ResidualBlockUpsample(nn.Module):
    """Sub-pixel upsampling residual block (main path and shortcut both sub-pixel convs)."""

    def __init__(self, in_ch: int, out_ch: int, upsample: int = 2) -> None:
        super().__init__()
        self.subpel_conv = subpel_conv1x1(in_ch, out_ch, upsample)
        self.leaky_relu = nn.LeakyReLU()
        self.conv = conv3x3(out_ch, out_ch)
        self.leaky_relu2 = nn.LeakyReLU(negative_slope=0.1)
        self.upsample = subpel_conv1x1(in_ch, out_ch, upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaky_relu2(self.conv(self.leaky_relu(self.subpel_conv(x))))
        return out + self.upsample(x)


class ResidualBottleneck(nn.Module):
    """x + (1x1 -> GELU -> 3x3 -> GELU -> 1x1)(x), with N/2 hidden channels."""

    def __init__(self, N: int = 192, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            conv1x1(N, N // 2), act(), conv3x3(N // 2, N // 2), act(), conv1x1(N // 2, N),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


# --------------------------------------------------------------------------- SFT

def _match_size(ref: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # The official SFT always calls adaptive_avg_pool2d(ref, x.size()[2:]). In the LFGCM
    # the two branches always have the same spatial size, where pooling is the identity
    # (mean over one element), so skip it: same numbers, and the ONNX graph stays simple.
    if tuple(ref.shape[-2:]) == tuple(size):
        return ref
    return F.adaptive_avg_pool2d(ref, size)


class SFT(nn.Module):
    """Spatial feature transform: ``x * (1 + gamma(ref)) + beta(ref)``."""

    def __init__(self, x_nc: int, prior_nc: int, ks: int = 3, nhidden: int = 128) -> None:
        super().__init__()
        pw = ks // 2
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(prior_nc, nhidden, kernel_size=ks, padding=pw),
            nn.LeakyReLU(0.2),
        )
        self.mlp_gamma = nn.Conv2d(nhidden, x_nc, kernel_size=ks, padding=pw)
        self.mlp_beta = nn.Conv2d(nhidden, x_nc, kernel_size=ks, padding=pw)

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(_match_size(ref, x.shape[2:]))
        gamma = self.mlp_gamma(actv)
        beta = self.mlp_beta(actv)
        return x * (1 + gamma) + beta


class SFTResblk(nn.Module):
    """Residual block of two (SFT -> leaky ReLU 0.2 -> 3x3 conv) stages."""

    def __init__(self, x_nc: int, prior_nc: int, ks: int = 3) -> None:
        super().__init__()
        self.conv_0 = nn.Conv2d(x_nc, x_nc, kernel_size=3, padding=1)
        self.conv_1 = nn.Conv2d(x_nc, x_nc, kernel_size=3, padding=1)
        self.norm_0 = SFT(x_nc, prior_nc, ks=ks)
        self.norm_1 = SFT(x_nc, prior_nc, ks=ks)

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, ref), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, ref), 0.2))
        return x + dx


# --------------------------------------------------------------------------- checkerboard
#
# Anchor positions: (even row, odd col) and (odd row, even col).
# Non-anchor positions: (even, even) and (odd, odd).
# "Squeezed" maps keep W/2 columns per row: for anchors, row r keeps cols 1::2 if r is
# even and 0::2 if odd; non-anchors the other way round. This is the official stream order.

def anchor_mask(h: int, w: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, h, w) mask, 1 at anchor positions."""
    r = torch.arange(h, device=device).view(h, 1)
    c = torch.arange(w, device=device).view(1, w)
    return ((r + c) % 2 == 1).to(dtype).view(1, 1, h, w)


def nonanchor_mask(h: int, w: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, h, w) mask, 1 at non-anchor positions."""
    r = torch.arange(h, device=device).view(h, 1)
    c = torch.arange(w, device=device).view(1, w)
    return ((r + c) % 2 == 0).to(dtype).view(1, 1, h, w)


def _keep(y: torch.Tensor, even_row_col: int) -> torch.Tensor:
    # Zeros except at the positions whose column parity in even rows is even_row_col
    # (the odd rows take the other parity). Built by copying, never by multiplying, so
    # the kept values are bit-identical and the rest exactly 0 (as the official code).
    out = torch.zeros_like(y)
    out[:, :, 0::2, even_row_col::2] = y[:, :, 0::2, even_row_col::2]
    out[:, :, 1::2, 1 - even_row_col::2] = y[:, :, 1::2, 1 - even_row_col::2]
    return out


def ckbd_anchor(y: torch.Tensor) -> torch.Tensor:
    """y with non-anchor positions zeroed."""
    return _keep(y, 1)


def ckbd_nonanchor(y: torch.Tensor) -> torch.Tensor:
    """y with anchor positions zeroed."""
    return _keep(y, 0)


def _squeeze(y: torch.Tensor, even_row_col: int) -> torch.Tensor:
    b, c, h, w = y.shape
    if w % 2:
        raise ValueError(f"checkerboard squeeze needs an even width, got {w}")
    out = y.new_zeros((b, c, h, w // 2))
    out[:, :, 0::2, :] = y[:, :, 0::2, even_row_col::2]
    out[:, :, 1::2, :] = y[:, :, 1::2, 1 - even_row_col::2]
    return out


def _unsqueeze(s: torch.Tensor, even_row_col: int) -> torch.Tensor:
    b, c, h, w2 = s.shape
    out = s.new_zeros((b, c, h, w2 * 2))
    out[:, :, 0::2, even_row_col::2] = s[:, :, 0::2, :]
    out[:, :, 1::2, 1 - even_row_col::2] = s[:, :, 1::2, :]
    return out


def ckbd_anchor_squeeze(y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W/2): the anchor values in stream order."""
    return _squeeze(y, 1)


def ckbd_nonanchor_squeeze(y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W/2): the non-anchor values in stream order."""
    return _squeeze(y, 0)


def ckbd_anchor_unsqueeze(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ckbd_anchor_squeeze`, zeros at non-anchor positions."""
    return _unsqueeze(s, 1)


def ckbd_nonanchor_unsqueeze(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ckbd_nonanchor_squeeze`, zeros at anchor positions."""
    return _unsqueeze(s, 0)
