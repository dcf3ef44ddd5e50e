"""The SD 2.1 denoising UNet and the DiffEIC control module (CDDM), in the ldm key layout.

This module owns:

* ``UNetModel``: the ldm ``openaimodel.UNetModel`` as SD 2.1 configures it (spatial
  transformers, no class conditioning), with an optional list of control residuals.
* ``ControlModule``: the official ``model.diffeic.CDDM`` minus the base UNet: the
  narrow control encoder (``control_model.*``), the zero convs ``enc_zero_convs_out``,
  ``middle_block_out``, ``dec_zero_convs_out`` and the ``scale_list`` buffer. Its keys
  are those of ``lc.ckpt`` under ``control_model.``.
* ``ControlledUNet``: both together; ``forward(x_t, t, c_latent, context)`` equals the
  official ``DiffEIC.apply_model``.

Why the split is exact: in the official ``CDDM.forward`` the control branch never reads
the base hidden state. It runs on ``cat(x_t, hint)`` through its own input and middle
blocks; the base only *receives* ``zero_conv(h_ctr) * scale``: after each input block
(``h_base += enc_i``, the sum is kept as the skip), after the middle block
(``+= mid``) and before each output block (``h_base += dec_j`` with the control encoder
features popped in reverse, then the skip is concatenated). So the control module is
a separate graph ``(x_t, t, c_latent[, context]) -> 2*n_input_blocks + 1`` residuals and
the UNet consumes them; the composition performs the same float operations.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .blocks import (
    Downsample,
    NormFactory,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    control_norm,
    find_denominator,
    fold_module_context,
    timestep_embedding,
    unet_norm,
)


def _check_supported(p: Mapping[str, Any], where: str) -> None:
    """Reject official options whose code paths this inference port does not implement."""
    if not p.get("use_spatial_transformer", True):
        raise ValueError(f"{where}: use_spatial_transformer=False (AttentionBlock UNets) is not supported")
    if p.get("legacy", False):
        raise ValueError(f"{where}: legacy=True head sizing is not supported (SD 2.x uses legacy=False)")
    for key in ("num_classes", "disable_self_attentions", "num_attention_blocks", "n_embed"):
        if p.get(key) is not None:
            raise ValueError(f"{where}: option {key}={p[key]!r} is not supported")
    for key in ("use_scale_shift_norm", "resblock_updown", "disable_middle_self_attn"):
        if p.get(key, False):
            raise ValueError(f"{where}: option {key}=True is not supported")
    if not p.get("conv_resample", True):
        raise ValueError(f"{where}: conv_resample=False is not supported")
    if p.get("dims", 2) != 2:
        raise ValueError(f"{where}: only dims=2 is supported")
    if p.get("num_head_channels", -1) == -1 and p.get("num_heads", -1) == -1:
        raise ValueError(f"{where}: either num_heads or num_head_channels has to be set")


def _res_blocks(p: Mapping[str, Any]) -> list[int]:
    nrb = p["num_res_blocks"]
    mult = list(p["channel_mult"])
    if isinstance(nrb, int):
        return [nrb] * len(mult)
    if len(nrb) != len(mult):
        raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
    return list(nrb)


def _depth(p: Mapping[str, Any]) -> int:
    d = p.get("transformer_depth", 1)
    if not isinstance(d, int):
        raise ValueError(f"transformer_depth must be an int, got {d!r}")
    return d


def unet_channel_plan(model_channels: int, channel_mult: Sequence[int], num_res_blocks: Sequence[int]) -> dict[str, list[int]]:
    """Output channels of every input block, of the middle block and of every output block."""
    enc = [model_channels]
    ch = model_channels
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks[level]):
            ch = mult * model_channels
            enc.append(ch)
        if level != len(channel_mult) - 1:
            enc.append(ch)
    dec = []
    for level, mult in reversed(list(enumerate(channel_mult))):
        for _ in range(num_res_blocks[level] + 1):
            dec.append(mult * model_channels)
    return {"enc": enc, "mid": [ch], "dec": dec}


def _time_embed(model_channels: int) -> nn.Sequential:
    dim = model_channels * 4
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


class UNetModel(nn.Module):
    """ldm UNetModel (SD 2.x flavour). ``forward(x_t, t, context, residuals)`` -> eps."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__()
        _check_supported(params, "unet_config")
        mc = int(params["model_channels"])
        mult = list(params["channel_mult"])
        nrb = _res_blocks(params)
        attn_res = set(params["attention_resolutions"])
        ctx_dim = int(params["context_dim"])
        depth = _depth(params)
        linear = bool(params.get("use_linear_in_transformer", False))
        num_heads = int(params.get("num_heads", -1))
        nhc = int(params.get("num_head_channels", -1))
        emb_dim = mc * 4
        self.model_channels = mc

        def heads(ch: int) -> tuple[int, int]:
            # (heads, dim_head) as the official non-legacy rule computes them.
            return (num_heads, ch // num_heads) if nhc == -1 else (ch // nhc, nhc)

        def transformer(ch: int) -> SpatialTransformer:
            h, d = heads(ch)
            return SpatialTransformer(ch, h, d, ctx_dim, depth=depth, use_linear=linear)

        self.time_embed = _time_embed(mc)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(int(params["in_channels"]), mc, 3, padding=1))]
        )
        chans = [mc]
        ch, ds = mc, 1
        for level, m in enumerate(mult):
            for _ in range(nrb[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, m * mc, unet_norm)]
                ch = m * mc
                if ds in attn_res:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, ch)))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, unet_norm), transformer(ch), ResBlock(ch, emb_dim, ch, unet_norm)
        )

        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nrb[level] + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, m * mc, unet_norm)]
                ch = m * mc
                if ds in attn_res:
                    layers.append(transformer(ch))
                if level and i == nrb[level]:
                    layers.append(Upsample(ch, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(unet_norm(ch), nn.SiLU(), nn.Conv2d(mc, int(params["out_channels"]), 3, padding=1))

    @property
    def num_residuals(self) -> int:
        """Length of the ``residuals`` list ``forward`` accepts (enc + mid + dec)."""
        return len(self.input_blocks) + 1 + len(self.output_blocks)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        residuals: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Predict eps. ``residuals`` (from ``ControlModule``) are added after each input
        block, after the middle block and before each output block, in that order."""
        n_in = len(self.input_blocks)
        if residuals is not None and len(residuals) != self.num_residuals:
            raise ValueError(f"expected {self.num_residuals} control residuals, got {len(residuals)}")
        emb = self.time_embed(timestep_embedding(t.reshape(-1), self.model_channels))
        hs = []
        h = x_t
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if residuals is not None:
                h = h + residuals[i]
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if residuals is not None:
            h = h + residuals[n_in]
        for j, block in enumerate(self.output_blocks):
            if residuals is not None:
                h = h + residuals[n_in + 1 + j]
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    def fold_context(self, context: torch.Tensor) -> None:
        """Cache cross-attention K/V for a constant ``context``; afterwards pass ``context=None``."""
        fold_module_context(self, context)


class ControlEncoder(nn.Module):
    """The narrow control network of CDDM (official ``ControlModule``): time MLP at the base
    width, input blocks and middle block at ``int(model_channels * control_model_ratio)``."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__()
        _check_supported(params, "control_stage_config")
        base_mc = int(params["model_channels"])
        mc = int(base_mc * float(params.get("control_model_ratio", 1.0)))
        mult = list(params["channel_mult"])
        nrb = _res_blocks(params)
        attn_res = set(params["attention_resolutions"])
        ctx_dim = int(params["context_dim"])
        depth = _depth(params)
        linear = bool(params.get("use_linear_in_transformer", False))
        num_heads = int(params.get("num_heads", -1))
        nhc_start = int(params.get("num_head_channels", -1))
        emb_dim = base_mc * 4  # the control time MLP keeps the base width
        norm: NormFactory = control_norm
        self.base_model_channels = base_mc
        self.model_channels = mc

        self.time_embed = _time_embed(base_mc)
        in_ch = int(params["in_channels"]) + int(params["hint_channels"])
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_ch, mc, 3, padding=1))])
        self.out_channels_per_block = [mc]
        # The official code re-assigns num_head_channels = find_denominator(ch, start) at each
        # attention level, and the middle block reuses the last value assigned.
        nhc = nhc_start
        ch, ds = mc, 1
        for level, m in enumerate(mult):
            for _ in range(nrb[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, m * mc, norm)]
                ch = m * mc
                if ds in attn_res:
                    if nhc_start == -1:
                        h, d = num_heads, ch // num_heads
                    else:
                        nhc = find_denominator(ch, nhc_start)
                        h, d = ch // nhc, nhc
                    layers.append(SpatialTransformer(ch, h, d, ctx_dim, depth=depth, use_linear=linear))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.out_channels_per_block.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, ch)))
                self.out_channels_per_block.append(ch)
                ds *= 2
        h, d = (num_heads, ch // num_heads) if nhc_start == -1 else (ch // nhc, nhc)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, norm),
            SpatialTransformer(ch, h, d, ctx_dim, depth=depth, use_linear=linear),
            ResBlock(ch, emb_dim, ch, norm),
        )
        self.mid_channels = ch


def _zero_conv(cin: int, cout: int) -> TimestepEmbedSequential:
    # Official zero convs are TimestepEmbedSequential(conv): keys "<i>.0.weight".
    return TimestepEmbedSequential(nn.Conv2d(cin, cout, 1))


class ControlModule(nn.Module):
    """CDDM without the base UNet. ``forward`` returns the residuals the UNet adds:
    ``[enc_0 .. enc_{n-1}, mid, dec_0 .. dec_{n-1}]`` (n = number of input blocks),
    each already multiplied by its ``scale_list`` entry."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__()
        self.control_model = ControlEncoder(params)
        ctr = self.control_model.out_channels_per_block
        base = unet_channel_plan(int(params["model_channels"]), list(params["channel_mult"]), _res_blocks(params))
        if len(base["enc"]) != len(ctr):
            raise ValueError("control and base UNet must have the same number of input blocks")
        self.enc_zero_convs_out = nn.ModuleList([_zero_conv(c, b) for c, b in zip(ctr, base["enc"])])
        self.middle_block_out = _zero_conv(self.control_model.mid_channels, base["mid"][0])
        # Decoder residual j is added to the input of output block j, i.e. to the output of
        # the middle block (j = 0) or of output block j-1; it comes from control enc -(j+1).
        dec_targets = base["mid"] + base["dec"][:-1]
        self.dec_zero_convs_out = nn.ModuleList(
            [_zero_conv(ctr[-(j + 1)], dec_targets[j]) for j in range(len(ctr))]
        )
        n = len(ctr)
        scale = float(params.get("control_scale", 1.0))
        self.register_buffer("scale_list", torch.ones(2 * n + 1) * scale)

    @property
    def num_residuals(self) -> int:
        return 2 * len(self.enc_zero_convs_out) + 1

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        c_latent: torch.Tensor,
        context: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        cm = self.control_model
        emb = cm.time_embed(timestep_embedding(t.reshape(-1), cm.base_model_channels))
        h = torch.cat([x_t, c_latent], dim=1)
        feats = []
        res_enc = []
        k = 0
        for block, zc in zip(cm.input_blocks, self.enc_zero_convs_out):
            h = block(h, emb, context)
            feats.append(h)
            res_enc.append(zc(h, emb) * self.scale_list[k])
            k += 1
        h = cm.middle_block(h, emb, context)
        res_mid = self.middle_block_out(h, emb) * self.scale_list[k]
        k += 1
        res_dec = []
        for zc in self.dec_zero_convs_out:
            res_dec.append(zc(feats.pop(), emb) * self.scale_list[k])
            k += 1
        return res_enc + [res_mid] + res_dec

    def fold_context(self, context: torch.Tensor) -> None:
        """Cache cross-attention K/V for a constant ``context``; afterwards pass ``context=None``."""
        fold_module_context(self, context)


class ControlledUNet(nn.Module):
    """Control module + base UNet: ``forward(x_t, t, c_latent, context)`` = ``DiffEIC.apply_model``."""

    def __init__(self, unet: UNetModel, control: ControlModule) -> None:
        super().__init__()
        if unet.num_residuals != control.num_residuals:
            raise ValueError(
                f"control module yields {control.num_residuals} residuals, UNet takes {unet.num_residuals}"
            )
        self.unet = unet
        self.control = control

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        c_latent: torch.Tensor,
        context: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        residuals = self.control(x_t, t, c_latent, context)
        return self.unet(x_t, t, context, residuals)

    def fold_context(self, context: torch.Tensor) -> None:
        """Fold a constant (batch-1) context, e.g. the empty-prompt embedding, into both
        networks' cross-attention; afterwards call ``forward(x_t, t, c_latent)``."""
        self.unet.fold_context(context)
        self.control.fold_context(context)
