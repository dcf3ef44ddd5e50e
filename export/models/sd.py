"""Build the SD / DiffEIC networks from a config and load official checkpoints strictly.

This module owns the mapping "checkpoint part -> module": the base UNet and the VAE
come from the SD 2.1 checkpoint (``model.diffusion_model.*``, ``first_stage_model.*``),
the control module from DiffEIC's ``lc.ckpt`` (``control_model.*``, including the
``scale_list`` buffer). Loading is strict: any missing, unexpected or mis-shaped key
raises ``CheckpointError`` naming the keys. Modules are returned in eval mode, float32.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..checkpoints import extract, load_into, require_parts
from ..config import DiffEICConfig
from .unet import ControlledUNet, ControlModule, UNetModel
from .vae import AutoencoderKL

State = Mapping[str, torch.Tensor]


def load_unet(sd_state: State, cfg: DiffEICConfig) -> UNetModel:
    """The base UNet from an SD 2.1-layout state dict (``model.diffusion_model.*``)."""
    require_parts(sd_state, ["unet"], "SD checkpoint")
    model = UNetModel(cfg.unet)
    load_into(model, extract(sd_state, "unet"), "SD checkpoint (model.diffusion_model.*)")
    return model.eval()


def load_control(lc_state: State, cfg: DiffEICConfig) -> ControlModule:
    """The CDDM control module from a DiffEIC ``lc.ckpt`` state dict (``control_model.*``)."""
    require_parts(lc_state, ["control"], "DiffEIC lc checkpoint")
    model = ControlModule(cfg.control)
    load_into(model, extract(lc_state, "control"), "DiffEIC lc checkpoint (control_model.*)")
    return model.eval()


def load_vae(sd_state: State, cfg: DiffEICConfig) -> AutoencoderKL:
    """The KL autoencoder from an SD-layout state dict (``first_stage_model.*``)."""
    require_parts(sd_state, ["vae"], "SD checkpoint")
    model = AutoencoderKL(cfg.vae, cfg.scale_factor)
    load_into(model, extract(sd_state, "vae"), "SD checkpoint (first_stage_model.*)")
    return model.eval()


def load_controlled_unet(sd_state: State, lc_state: State, cfg: DiffEICConfig) -> ControlledUNet:
    """Base UNet + control module, i.e. the network behind ``DiffEIC.apply_model``."""
    return ControlledUNet(load_unet(sd_state, cfg), load_control(lc_state, cfg)).eval()
