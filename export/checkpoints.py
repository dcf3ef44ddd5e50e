"""Checkpoint loading: official SD 2.1 / DiffEIC ``lc.ckpt`` layouts, read safely.

Nothing here executes pickled code: ``.ckpt``/``.pt``/``.pth`` files go through
``torch.load(weights_only=True)`` and ``.safetensors`` through safetensors. Floating
tensors stored as float16/bfloat16 are up-cast to float32 (the official loader does the
same implicitly when it copies into float32 parameters; we must not compute in fp16).

The official checkpoints are flat ``state_dict``s whose prefixes name the part:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.*`` (text encoder), ``control_model.*`` (control module) and
``preprocess_model.*`` (LFGCM), plus the DDPM schedule buffers at top level.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch

if TYPE_CHECKING:  # only for the annotation; config imports nothing from here
    from .config import DiffEICConfig

log = logging.getLogger(__name__)

PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text": "cond_stage_model.",
    "control": "control_model.",
    "lfgcm": "preprocess_model.",
}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of the wrong model, or does not fit the config."""


def _upcast(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue  # e.g. non-tensor metadata stored beside the weights
        out[k] = v.float() if v.is_floating_point() and v.dtype != torch.float64 else v
    return out


def load_state_dict_file(path: str | Path, cfg: "DiffEICConfig | None" = None) -> dict[str, torch.Tensor]:
    """Read one checkpoint file (``.ckpt``/``.pt``/``.pth``/``.bin`` or ``.safetensors``),
    or a diffusers SD 2.x folder (converted to the ldm layout, see ``diffusers_layout``).

    Returns the flat state dict with float tensors in float32. Raises CheckpointError
    naming the file and the reason for anything that is not a readable checkpoint.
    ``cfg`` (a ``DiffEICConfig``) is used only for a folder, to check its config.json files.
    """
    path = Path(path)
    if path.is_dir():
        from .diffusers_layout import load_diffusers_folder  # lazy: it imports this module

        return load_diffusers_folder(path, cfg)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
                obj = obj["state_dict"]
            if not isinstance(obj, Mapping):
                raise CheckpointError(f"{path}: expected a state_dict mapping, found {type(obj).__name__}")
            state = dict(obj)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated, corrupt or not a weights file): {msg}") from exc
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return _upcast(state)


def extract(state: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """The sub-dict of one part (``unet``, ``vae``, ``text``, ``control``, ``lfgcm``), prefix removed."""
    prefix = PREFIXES[part]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def require_parts(state: Mapping[str, torch.Tensor], parts: Iterable[str], where: str) -> None:
    """Fail clearly when a checkpoint lacks whole parts (e.g. an SD file given as lc.ckpt)."""
    missing = [p for p in parts if not any(k.startswith(PREFIXES[p]) for k in state)]
    if missing:
        found = sorted({k.split(".")[0] for k in state})[:8]
        raise CheckpointError(
            f"{where}: no weights for {missing} (expected keys starting with "
            f"{[PREFIXES[p] for p in missing]}; top-level names found: {found}). "
            "Is this the right checkpoint (SD 2.1 for --sd, DiffEIC lc.ckpt for --lc)?"
        )


def load_into(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    where: str,
    ignore: Iterable[str] = (),
) -> None:
    """Strictly load ``state`` into ``module``; on mismatch raise one error naming the keys.

    ``ignore`` lists key prefixes of the checkpoint that the module deliberately does
    not hold (e.g. compressai's empty CDF buffers, rebuilt at export time).
    """
    ignore = tuple(ignore)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else dict(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or mismatched:
        def head(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" ... (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys [{head(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{head(unexpected)}]")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches [{head(mismatched)}]")
        raise CheckpointError(
            f"{where}: checkpoint does not fit the configured model: " + "; ".join(parts)
            + ". Check that --config matches the checkpoint."
        )
    dtype_fixed = {k: v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(dtype_fixed, strict=True)
    log.debug("%s: loaded %d tensors", where, len(state))
