"""Model configuration: the official DiffEIC YAML layout read into one frozen value.

The official code instantiates every network from ``configs/model/diffeic.yaml``
(``params.unet_config.params``, ``params.control_stage_config.params``, ...). We read
the same layout so that any official (or fixture) YAML works unchanged, validate the
keys we rely on, and expose them as plain dicts grouped in one dataclass. The paper
configuration and the tiny test configuration ship inside the package
(``export/configs``), selected by preset name.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESETS: dict[str, Path] = {
    "paper": CONFIG_DIR / "diffeic.yaml",
    "tiny": CONFIG_DIR / "tiny.yaml",
}

# Keys each sub-config must hold: the ones our model definitions read.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "unet_config": (
        "in_channels", "out_channels", "model_channels", "attention_resolutions",
        "num_res_blocks", "channel_mult", "num_head_channels", "context_dim",
        "use_linear_in_transformer", "transformer_depth",
    ),
    "control_stage_config": (
        "in_channels", "hint_channels", "model_channels", "attention_resolutions",
        "num_res_blocks", "channel_mult", "num_head_channels", "context_dim",
        "control_model_ratio", "use_linear_in_transformer", "transformer_depth",
    ),
    "first_stage_config": ("embed_dim", "ddconfig"),
    "preprocess_config": (
        "in_nc", "out_nc", "enc_mid", "N", "M", "prior_nc", "sft_ks", "slice_num", "slice_ch",
    ),
}
_REQUIRED_TOP = ("linear_start", "linear_end", "timesteps", "scale_factor")
_REQUIRED_DDCONFIG = (
    "double_z", "z_channels", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
    "attn_resolutions",
)


class ConfigError(ValueError):
    """A model configuration is missing keys or holds inconsistent values."""


@dataclass(frozen=True)
class DiffEICConfig:
    """Every size the DiffEIC networks are built from, in the official key names."""

    unet: Mapping[str, Any]
    control: Mapping[str, Any]
    vae: Mapping[str, Any]  # {"embed_dim": int, "ddconfig": {...}}
    lfgcm: Mapping[str, Any]
    scale_factor: float
    linear_start: float
    linear_end: float
    timesteps: int
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "unet": dict(self.unet), "control": dict(self.control), "vae": dict(self.vae),
            "lfgcm": dict(self.lfgcm), "scale_factor": self.scale_factor,
            "linear_start": self.linear_start, "linear_end": self.linear_end,
            "timesteps": self.timesteps,
        }

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the sizes (part of the model fingerprint)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def _params(root: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    node = root.get(key)
    if not isinstance(node, Mapping) or not isinstance(node.get("params"), Mapping):
        raise ConfigError(f"{where}: missing section '{key}.params'")
    params = copy.deepcopy(dict(node["params"]))
    missing = [k for k in _REQUIRED[key] if k not in params]
    if missing:
        raise ConfigError(f"{where}: '{key}.params' lacks required keys {missing}")
    return params


def parse_config(raw: Mapping[str, Any], where: str = "<config>") -> DiffEICConfig:
    """Validate an official-layout config (the YAML's top level) and group it."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("params"), Mapping):
        raise ConfigError(f"{where}: expected the official layout with a top-level 'params' mapping")
    p = raw["params"]
    missing = [k for k in _REQUIRED_TOP if k not in p]
    if missing:
        raise ConfigError(f"{where}: 'params' lacks required keys {missing}")
    unet = _params(p, "unet_config", where)
    control = _params(p, "control_stage_config", where)
    vae = _params(p, "first_stage_config", where)
    lfgcm = _params(p, "preprocess_config", where)
    dd_missing = [k for k in _REQUIRED_DDCONFIG if k not in vae["ddconfig"]]
    if dd_missing:
        raise ConfigError(f"{where}: 'first_stage_config.params.ddconfig' lacks required keys {dd_missing}")
    if len(lfgcm["slice_ch"]) != lfgcm["slice_num"] or sum(lfgcm["slice_ch"]) != lfgcm["M"]:
        raise ConfigError(
            f"{where}: preprocess_config slice_ch {lfgcm['slice_ch']} must have slice_num="
            f"{lfgcm['slice_num']} entries summing to M={lfgcm['M']}"
        )
    for k in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim"):
        if control[k] != unet[k]:
            raise ConfigError(f"{where}: control_stage_config.{k}={control[k]} differs from unet_config.{k}={unet[k]}")
    # Drop keys that only matter for training, so the fingerprint depends on sizes alone.
    for d in (unet, control):
        d.pop("use_checkpoint", None)
        d.pop("image_size", None)
    vae.pop("monitor", None)
    vae.pop("lossconfig", None)
    return DiffEICConfig(
        unet=unet, control=control, vae=vae, lfgcm=lfgcm,
        scale_factor=float(p["scale_factor"]), linear_start=float(p["linear_start"]),
        linear_end=float(p["linear_end"]), timesteps=int(p["timesteps"]), source=where,
    )


def load_config(path_or_preset: str | Path) -> DiffEICConfig:
    """Load a YAML file of the official layout, or a bundled preset by name."""
    key = str(path_or_preset)
    if key in PRESETS:
        path = PRESETS[key]
    else:
        path = Path(path_or_preset)
        if not path.is_file():
            raise ConfigError(
                f"config '{key}' is neither a file nor a preset; valid presets: {sorted(PRESETS)}"
            )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return parse_config(raw, str(path))
