"""Read a diffusers SD 2.x folder (``stabilityai/stable-diffusion-2-1-base`` layout) as an ldm state dict.

``--sd`` may name a diffusers folder instead of the official ``.ckpt``/``.safetensors``.
This module turns such a folder into the flat ldm-layout state dict the rest of the
export reads (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.model.*`` and the ``alphas_cumprod`` schedule buffer), so the model
definitions in ``export/models`` load it with their usual strict ``load_into``.

Folder layout read::

    unet/config.json          unet/diffusion_pytorch_model[.fp16].{safetensors,bin}
    vae/config.json           vae/diffusion_pytorch_model[.fp16].{safetensors,bin}
    text_encoder/config.json  text_encoder/model[.fp16].safetensors | pytorch_model[.fp16].bin  (optional)
    scheduler/scheduler_config.json                                                             (optional)

Weights are read only through safetensors or ``torch.load(weights_only=True)`` (via
``checkpoints.load_state_dict_file``) and float16/bfloat16 tensors are up-cast to float32.

The key mapping is the inverse of diffusers' ldm -> diffusers conversion, derived from
the block structure (not a copied table):

* UNet: ldm numbers input/output blocks consecutively, diffusers groups them per level
  (``down_blocks.L.resnets.j`` / ``attentions.j`` / ``downsamplers.0``). ResBlock
  sub-layers are renamed (``norm1`` -> ``in_layers.0`` ...); the spatial transformer
  keeps its names. SD 2.x uses linear ``proj_in``/``proj_out`` in both layouts, so no
  reshape is needed (with ``use_linear_projection: false`` both sides are 1x1 convs).
* VAE: ``down_blocks.L`` -> ``down.L``, ``up_blocks.U`` -> ``up.(n-1-U)`` (ldm counts
  decoder levels from the highest resolution), ``mid_block`` -> ``mid.block_1/attn_1/
  block_2``. The mid attention is Linear in diffusers and a 1x1 conv in ldm:
  ``(out, in)`` -> ``(out, in, 1, 1)``.
* Text encoder (transformers ``CLIPTextModel``) -> open_clip names, q/k/v concatenated
  into ``in_proj_weight``. diffusers' SD 2.x conversion *drops* open_clip's last
  residual block (the pipeline only uses the penultimate layer), so the folder holds
  23 of ViT-H's 24 blocks. ``empty_prompt_context`` skips the last block
  (``layer="penultimate"``), so we append one all-zero block: with zero weights a pre-LN
  residual block is exactly the identity, and skipping it runs precisely the stored blocks.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from .checkpoints import PREFIXES, CheckpointError, load_state_dict_file
from .config import DiffEICConfig

log = logging.getLogger(__name__)

# Weight file names, in order of preference (safetensors first: no pickle at all).
_MODEL_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_TEXT_FILES = (
    "model.safetensors",
    "model.fp16.safetensors",
    "pytorch_model.bin",
    "pytorch_model.fp16.bin",
)
_TEXT_PREFIX = PREFIXES["text"] + "model."


def is_diffusers_folder(path: str | Path) -> bool:
    """True when ``path`` is a directory laid out as a diffusers pipeline (has ``unet/config.json``
    or ``model_index.json``)."""
    p = Path(path)
    return p.is_dir() and ((p / "unet" / "config.json").is_file() or (p / "model_index.json").is_file())


# =========================================================================== file reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def _read_component(folder: Path, name: str, candidates: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the (fp32-upcast) weights of one pipeline component."""
    sub = folder / name
    if not sub.is_dir():
        raise CheckpointError(
            f"{folder}: diffusers folder lacks '{name}/' (expected {name}/config.json and "
            f"{name}/{candidates[0]})"
        )
    cfg_path = sub / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{sub}: missing config.json")
    config = _read_json(cfg_path)
    for fname in candidates:
        f = sub / fname
        if f.is_file():
            log.info("reading %s", f)
            return config, load_state_dict_file(f)
        index = sub / (fname + ".index.json")
        if index.is_file():
            # Sharded weights: the index maps each tensor name to its shard file.
            weight_map = _read_json(index).get("weight_map", {})
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                log.info("reading %s", sub / shard)
                state.update(load_state_dict_file(sub / shard))
            return config, state
    raise CheckpointError(f"{sub}: no weights file (looked for {', '.join(candidates)})")


# =========================================================================== config checks


def _levels(n: Any, count: int) -> list[Any]:
    return list(n) if isinstance(n, (list, tuple)) else [n] * count


def _unet_mismatches(uc: Mapping[str, Any], p: Mapping[str, Any]) -> list[str]:
    """Fields of diffusers' unet/config.json that disagree with the ldm ``unet_config.params``."""
    mc = int(p["model_channels"])
    mult = list(p["channel_mult"])
    n = len(mult)
    nrb = _levels(p["num_res_blocks"], n)
    chans = [mc * m for m in mult]
    attn = [2 ** lvl in set(p["attention_resolutions"]) for lvl in range(n)]
    nhc, nh = int(p.get("num_head_channels", -1)), int(p.get("num_heads", -1))
    # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads
    # (a naming quirk kept for SD 2.x compatibility); ldm gives head *width* instead.
    heads = [c // nhc if nhc != -1 else nh for c in chans]
    expected: dict[str, Any] = {
        "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]),
        "block_out_channels": chans,
        "layers_per_block": nrb,
        "cross_attention_dim": int(p["context_dim"]),
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": [int(p.get("transformer_depth", 1))] * n,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    }
    out: list[str] = []
    for key, want in expected.items():
        got = uc.get(key)
        if key in ("layers_per_block", "transformer_layers_per_block"):
            got = _levels(1 if got is None else got, n)
        elif isinstance(got, tuple):
            got = list(got)
        if got != want:
            out.append(f"unet.{key}={got!r} (config expects {want!r})")
    got_heads = _levels(uc.get("attention_head_dim", 8), n)
    # Heads matter only where there is attention (and in the middle block, which uses the last level's).
    idx = [i for i in range(n) if attn[i]] + [n - 1]
    if len(got_heads) != n or any(got_heads[i] != heads[i] for i in idx):
        out.append(f"unet.attention_head_dim={uc.get('attention_head_dim')!r} (number of heads per level; "
                   f"config expects {heads!r} at the attention levels)")
    return out + _unsupported_unet_options(uc)


def _unsupported_unet_options(uc: Mapping[str, Any]) -> list[str]:
    """UNet options our ldm port implements only in their SD 2.x setting (the diffusers defaults)."""
    n = len(uc.get("down_block_types", []))
    fixed: dict[str, Any] = {
        "mid_block_type": "UNetMidBlock2DCrossAttn", "flip_sin_to_cos": True, "freq_shift": 0,
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
        "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
        "addition_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
        "time_cond_proj_dim": None, "num_attention_heads": None,
    }
    out: list[str] = []
    for key, want in fixed.items():
        got = uc.get(key, want)
        if got != want and not (isinstance(want, bool) and list(_levels(got, n)) == [want] * n):
            out.append(f"unet.{key}={got!r} (only {want!r} is supported)")
    return out


def _vae_mismatches(vc: Mapping[str, Any], vp: Mapping[str, Any], scale_factor: Optional[float]) -> list[str]:
    """Fields of diffusers' vae/config.json that disagree with ``first_stage_config.params``."""
    dd = vp["ddconfig"]
    ch, mult = int(dd["ch"]), list(dd["ch_mult"])
    expected: dict[str, Any] = {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "block_out_channels": [ch * m for m in mult],
        "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(dd["z_channels"]),
        "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * len(mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(mult),
    }
    out: list[str] = []
    for key, want in expected.items():
        got = vc.get(key)
        got = list(got) if isinstance(got, tuple) else got
        if got != want:
            out.append(f"vae.{key}={got!r} (config expects {want!r})")
    if int(vp["embed_dim"]) != int(dd["z_channels"]):
        # diffusers' quant convs map 2*latent -> 2*latent; ldm allows embed_dim != z_channels.
        out.append(f"config embed_dim={vp['embed_dim']} != z_channels={dd['z_channels']} (not expressible in diffusers)")
    if list(dd["attn_resolutions"]):
        out.append(f"config attn_resolutions={list(dd['attn_resolutions'])} (diffusers VAEs have attention only in the middle)")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if vc.get(key, True) is not True:
            out.append(f"vae.{key}={vc[key]!r} (only true is supported)")
    sf = vc.get("scaling_factor")
    if scale_factor is not None and sf is not None and abs(float(sf) - scale_factor) > 1e-9:
        out.append(f"vae.scaling_factor={sf} (config scale_factor is {scale_factor})")
    return out


def check_diffusers_configs(folder: str | Path, cfg: DiffEICConfig) -> None:
    """Raise CheckpointError naming every unet/vae config.json field that does not fit ``cfg``."""
    folder = Path(folder)
    problems: list[str] = []
    for name, check in (("unet", lambda c: _unet_mismatches(c, cfg.unet)),
                        ("vae", lambda c: _vae_mismatches(c, cfg.vae, cfg.scale_factor))):
        path = folder / name / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: diffusers folder lacks '{name}/config.json'")
        problems += check(_read_json(path))
    if problems:
        raise CheckpointError(
            f"{folder}: the diffusers configs do not fit the model config ({cfg.source or 'given'}): "
            + "; ".join(problems) + ". Check that --config matches the checkpoint."
        )


# =========================================================================== key mapping


def _rename(state: Mapping[str, torch.Tensor], rules: list[tuple[str, str]], where: str,
            transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Apply the first matching ``(diffusers_prefix, ldm_prefix)`` rule to every key.

    Every key must match a rule: an unknown tensor means a layout we do not understand,
    and silently dropping it would hide a wrong conversion.
    """
    # Longest prefix first so that "x.resnets.1." wins over "x.".
    rules = sorted(rules, key=lambda r: -len(r[0]))
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        for src, dst in rules:
            if key.startswith(src):
                new = dst + key[len(src):]
                out[new] = transform(new, value) if transform else value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} tensors of unknown layout, e.g. {sorted(unknown)[:5]}")
    return out


_UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def _unet_rules(uc: Mapping[str, Any]) -> list[tuple[str, str]]:
    down = list(uc.get("down_block_types", []))
    up = list(uc.get("up_block_types", []))
    n = len(down)
    nrb = _levels(uc.get("layers_per_block", 2), n)
    rules = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]

    def resnet(src: str, dst: str) -> None:
        rules.extend((src + a, dst + b) for a, b in _UNET_RESNET)

    k = 1  # ldm input block index (0 is conv_in)
    for lvl in range(n):
        for j in range(nrb[lvl]):
            resnet(f"down_blocks.{lvl}.resnets.{j}.", f"input_blocks.{k}.0.")
            rules.append((f"down_blocks.{lvl}.attentions.{j}.", f"input_blocks.{k}.1."))
            k += 1
        if lvl != n - 1:
            rules.append((f"down_blocks.{lvl}.downsamplers.0.conv.", f"input_blocks.{k}.0.op."))
            k += 1
    resnet("mid_block.resnets.0.", "middle_block.0.")
    rules.append(("mid_block.attentions.0.", "middle_block.1."))
    resnet("mid_block.resnets.1.", "middle_block.2.")
    k = 0  # ldm output block index
    for u in range(len(up)):
        lvl = n - 1 - u
        has_attn = "CrossAttn" in up[u]
        for j in range(nrb[lvl] + 1):
            resnet(f"up_blocks.{u}.resnets.{j}.", f"output_blocks.{k}.0.")
            rules.append((f"up_blocks.{u}.attentions.{j}.", f"output_blocks.{k}.1."))
            if lvl != 0 and j == nrb[lvl]:
                rules.append((f"up_blocks.{u}.upsamplers.0.conv.", f"output_blocks.{k}.{2 if has_attn else 1}.conv."))
            k += 1
    return rules


_VAE_RESNET = [("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
               ("conv_shortcut.", "nin_shortcut.")]
# Mid attention, current (to_q ...) and pre-0.14 (query ...) diffusers names.
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."),
             ("query.", "q."), ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out.")]


def _vae_rules(vc: Mapping[str, Any]) -> list[tuple[str, str]]:
    n = len(vc.get("block_out_channels", []))
    nrb = int(vc.get("layers_per_block", 2))
    rules = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.")]
        for i in (0, 1):
            rules += [(f"{part}.mid_block.resnets.{i}.{a}", f"{part}.mid.block_{i + 1}.{b}") for a, b in _VAE_RESNET]
        rules += [(f"{part}.mid_block.attentions.0.{a}", f"{part}.mid.attn_1.{b}") for a, b in _VAE_ATTN]
    for lvl in range(n):
        for j in range(nrb):
            rules += [(f"encoder.down_blocks.{lvl}.resnets.{j}.{a}", f"encoder.down.{lvl}.block.{j}.{b}")
                      for a, b in _VAE_RESNET]
        rules.append((f"encoder.down_blocks.{lvl}.downsamplers.0.conv.", f"encoder.down.{lvl}.downsample.conv."))
    for u in range(n):
        lvl = n - 1 - u  # ldm's decoder.up[0] is the full-resolution level, diffusers' up_blocks[0] the lowest
        for j in range(nrb + 1):
            rules += [(f"decoder.up_blocks.{u}.resnets.{j}.{a}", f"decoder.up.{lvl}.block.{j}.{b}")
                      for a, b in _VAE_RESNET]
        rules.append((f"decoder.up_blocks.{u}.upsamplers.0.conv.", f"decoder.up.{lvl}.upsample.conv."))
    return rules


def _vae_to_conv(key: str, value: torch.Tensor) -> torch.Tensor:
    # ldm's VAE attention projections are 1x1 convs; diffusers stores them as Linear.
    if ".attn_1." in key and key.endswith(".weight") and value.ndim == 2 and not key.endswith("norm.weight"):
        return value[:, :, None, None].contiguous()
    return value


def convert_unet(state: Mapping[str, torch.Tensor], uc: Mapping[str, Any], where: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights -> ldm ``UNetModel`` keys (no prefix)."""
    return _rename(state, _unet_rules(uc), where)


def convert_vae(state: Mapping[str, torch.Tensor], vc: Mapping[str, Any], where: str = "vae") -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL weights -> ldm ``AutoencoderKL`` keys (no prefix)."""
    return _rename(state, _vae_rules(vc), where, _vae_to_conv)


def convert_text_encoder(state: Mapping[str, torch.Tensor], tc: Mapping[str, Any],
                         where: str = "text_encoder") -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights -> open_clip text-tower keys (no prefix).

    Appends one all-zero (identity) block after the stored ones, so that
    ``empty_prompt_context`` (penultimate layer) computes what the diffusers pipeline
    computes (see the module docstring).
    """
    s = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    s.pop("embeddings.position_ids", None)  # a buffer of older transformers versions, not a weight
    act = tc.get("hidden_act", "gelu")
    if act != "gelu":
        # empty_prompt_context uses exact GELU (open_clip ViT-H); quick_gelu would give a wrong context.
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (SD 2.x's OpenCLIP uses 'gelu')")
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    sub = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
           "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
    qkv: dict[tuple[int, str, str], torch.Tensor] = {}
    unknown: list[str] = []
    for key, v in s.items():
        if key in simple:
            out[simple[key]] = v
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if not m:
            unknown.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        q = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if q:
            qkv[(i, q.group(2), q.group(1))] = v
            continue
        for a, b in sub.items():
            if rest.startswith(a):
                out[f"transformer.resblocks.{i}.{b}{rest[len(a):]}"] = v
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} tensors of unknown layout, e.g. {sorted(unknown)[:5]}")
    layers = sorted({i for i, _, _ in qkv})
    for i in layers:
        for kind in ("weight", "bias"):
            try:
                parts = [qkv[(i, kind, c)] for c in "qkv"]
            except KeyError as exc:
                raise CheckpointError(f"{where}: layer {i} lacks a q/k/v {kind}") from exc
            # open_clip's nn.MultiheadAttention packs [q; k; v] along the output dimension.
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    n_cfg = int(tc.get("num_hidden_layers", len(layers)))
    if len(layers) != n_cfg:
        raise CheckpointError(f"{where}: {len(layers)} layers stored, config says num_hidden_layers={n_cfg}")
    if layers:
        # A diffusers text encoder holds exactly the blocks its pipeline runs (last_hidden_state
        # after final_layer_norm); SD 2.x's conversion dropped open_clip's final block. Append an
        # identity block so that "penultimate" (skip the last block) runs exactly the stored ones.
        ref = f"transformer.resblocks.{layers[-1]}."
        nxt = f"transformer.resblocks.{layers[-1] + 1}."
        for k in [k for k in out if k.startswith(ref)]:
            out[nxt + k[len(ref):]] = torch.zeros_like(out[k])
    return out


def _schedule_buffer(sc: Mapping[str, Any], where: str) -> torch.Tensor:
    """``alphas_cumprod`` as ldm's register_schedule stores it, from scheduler_config.json."""
    from runtime.sampler import Schedule

    kind = sc.get("beta_schedule", "linear")
    if kind != "scaled_linear":
        # ldm's "linear" schedule (SD's) is diffusers' "scaled_linear" (linspace of sqrt(beta)).
        raise CheckpointError(f"{where}: beta_schedule={kind!r} is not supported (SD 2.x uses 'scaled_linear')")
    if sc.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: trained_betas is not supported")
    sched = Schedule(float(sc["beta_start"]), float(sc["beta_end"]), int(sc.get("num_train_timesteps", 1000)))
    return torch.from_numpy(sched.alphas_cumprod_f32().copy())


# =========================================================================== entry point


def load_diffusers_folder(path: str | Path, cfg: Optional[DiffEICConfig] = None) -> dict[str, torch.Tensor]:
    """Load a diffusers SD 2.x folder as an ldm-layout flat state dict (float32).

    With ``cfg`` the unet/vae ``config.json`` files are checked against it first, and a
    CheckpointError names every mismatched field. Without it, shape mismatches are still
    caught later by the strict ``load_into``, but head counts and scale factor are not.
    The text encoder and scheduler are optional: without ``text_encoder/`` the result has
    no ``cond_stage_model.*`` keys (pass ``--null-context``), without ``scheduler/`` no
    ``alphas_cumprod`` (the schedule is then not cross-checked).
    """
    folder = Path(path)
    if not is_diffusers_folder(folder):
        raise CheckpointError(
            f"{folder}: a directory, but not a diffusers pipeline folder (expected unet/config.json); "
            "--sd takes an ldm .ckpt/.safetensors file or a diffusers folder"
        )
    if cfg is not None:
        check_diffusers_configs(folder, cfg)
    uc, unet = _read_component(folder, "unet", _MODEL_FILES)
    vc, vae = _read_component(folder, "vae", _MODEL_FILES)
    if cfg is None:
        # Without sizes to compare, still refuse what the ldm port cannot express.
        problems = _unsupported_unet_options(uc)
        if problems:
            raise CheckpointError(f"{folder}: unsupported diffusers UNet options: " + "; ".join(problems))
    state: dict[str, torch.Tensor] = {}
    state.update({PREFIXES["unet"] + k: v for k, v in convert_unet(unet, uc, f"{folder}/unet").items()})
    state.update({PREFIXES["vae"] + k: v for k, v in convert_vae(vae, vc, f"{folder}/vae").items()})
    del unet, vae

    if (folder / "text_encoder").is_dir():
        tc, text = _read_component(folder, "text_encoder", _TEXT_FILES)
        state.update({_TEXT_PREFIX + k: v for k, v in convert_text_encoder(text, tc, f"{folder}/text_encoder").items()})
    else:
        log.warning("%s: no text_encoder/; the empty-prompt context must come from --null-context", folder)

    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        sc = _read_json(sched_path)
        prediction = sc.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            # DiffEIC is trained on SD 2.1-base (eps); the 768 v-model would silently give garbage.
            raise CheckpointError(f"{sched_path}: prediction_type={prediction!r}; DiffEIC needs an epsilon model "
                                  "(stable-diffusion-2-1-base)")
        state["alphas_cumprod"] = _schedule_buffer(sc, str(sched_path))
    else:
        log.warning("%s: no scheduler/scheduler_config.json; the noise schedule is not cross-checked", folder)
    log.info("%s: converted %d tensors from the diffusers layout", folder, len(state))
    return state

