"""``--sd`` given a diffusers folder: export/diffusers_layout.py against diffusers' own models.

A tiny diffusers UNet2DConditionModel and AutoencoderKL, configured like the golden
fixture's tiny config and randomly initialised, are saved with ``save_pretrained``; the
folder is loaded through ``load_state_dict_file`` (-> ldm layout) into our strict ldm
ports, and their forwards are compared with diffusers' forwards on random inputs.
The text-encoder mapping is checked against the open_clip-layout path it inverts.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoints import CheckpointError, extract, load_state_dict_file
from export.config import DiffEICConfig, load_config
from export.diffusers_layout import convert_text_encoder, is_diffusers_folder, load_diffusers_folder
from export.models.sd import load_unet, load_vae
from export.models.text import empty_prompt_context
from runtime.sampler import Schedule

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'diffusers>=0.30')")

log = logging.getLogger(__name__)
TOL = 1e-4
SEED = 1234
TEXT_WIDTH = 64  # tiny open_clip text tower: width 64 (1 head of 64), 3 blocks


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float((got - ref).abs().max() / ref.abs().max())


def _unet_config(cfg: DiffEICConfig) -> dict:
    """diffusers UNet2DConditionModel kwargs equivalent to the ldm ``unet_config.params``."""
    p = cfg.unet
    mc, mult = p["model_channels"], list(p["channel_mult"])
    attn = [2 ** i in set(p["attention_resolutions"]) for i in range(len(mult))]
    return dict(
        sample_size=32, in_channels=p["in_channels"], out_channels=p["out_channels"],
        block_out_channels=tuple(mc * m for m in mult), layers_per_block=p["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        # diffusers reads attention_head_dim as the number of heads (SD 2.x naming quirk).
        attention_head_dim=tuple(mc * m // p["num_head_channels"] for m in mult),
        cross_attention_dim=p["context_dim"], use_linear_projection=p["use_linear_in_transformer"],
        norm_num_groups=32,
    )


def _vae_config(cfg: DiffEICConfig) -> dict:
    dd = cfg.vae["ddconfig"]
    n = len(dd["ch_mult"])
    return dict(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"],
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"], norm_num_groups=32, scaling_factor=cfg.scale_factor,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    )


def _randomize(model: torch.nn.Module) -> None:
    # Perturb every parameter so no zero-initialised layer hides a mis-mapped tensor.
    for prm in model.parameters():
        prm.add_(torch.randn_like(prm) * 0.05)


def _open_clip_text_state(blocks: int, width: int = TEXT_WIDTH, seed: int = SEED) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    s = {"token_embedding.weight": r(49408, width), "positional_embedding": r(77, width),
         "ln_final.weight": 1 + r(width), "ln_final.bias": r(width)}
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        s.update({p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                  p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                  p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                  p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
                  p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
                  p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width)})
    return s


def _to_hf_text(oc: dict[str, torch.Tensor], keep_blocks: int) -> dict[str, torch.Tensor]:
    """open_clip -> transformers CLIPTextModel names, keeping the first ``keep_blocks`` blocks
    (as diffusers' SD 2.x conversion does: it drops the final one)."""
    hf = {"text_model.embeddings.token_embedding.weight": oc["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": oc["positional_embedding"],
          "text_model.final_layer_norm.weight": oc["ln_final.weight"],
          "text_model.final_layer_norm.bias": oc["ln_final.bias"]}
    for i in range(keep_blocks):
        p, q = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", oc[p + f"attn.in_proj_{kind}"].chunk(3, dim=0)):
                hf[q + f"self_attn.{name}_proj.{kind}"] = part.clone()
            hf[q + f"self_attn.out_proj.{kind}"] = oc[p + f"attn.out_proj.{kind}"]
            hf[q + f"layer_norm1.{kind}"] = oc[p + f"ln_1.{kind}"]
            hf[q + f"layer_norm2.{kind}"] = oc[p + f"ln_2.{kind}"]
            hf[q + f"mlp.fc1.{kind}"] = oc[p + f"mlp.c_fc.{kind}"]
            hf[q + f"mlp.fc2.{kind}"] = oc[p + f"mlp.c_proj.{kind}"]
    return hf


@pytest.fixture(scope="module")
def tiny(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A diffusers folder (unet, vae fp16 variant, text_encoder, scheduler) plus the diffusers models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    cfg = load_config(fixture_dir / "config.yaml")
    folder = tmp_path_factory.mktemp("diffusers") / "sd21-tiny"
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**_unet_config(cfg)).eval()
        vae = AutoencoderKL(**_vae_config(cfg)).eval()
        _randomize(unet)
        _randomize(vae)
    unet.save_pretrained(folder / "unet")
    # The VAE goes in as an fp16 variant, as the official repo's fp16 branch ships it; the
    # reference model is then the fp16 weights up-cast, i.e. what the loader must produce.
    vae.half().save_pretrained(folder / "vae", variant="fp16")
    vae.float()
    assert (folder / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()

    oc_text = _open_clip_text_state(blocks=3)
    (folder / "text_encoder").mkdir()
    save_file(_to_hf_text(oc_text, keep_blocks=2), str(folder / "text_encoder" / "model.safetensors"))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPTextModel"], "hidden_size": TEXT_WIDTH, "num_hidden_layers": 2,
         "num_attention_heads": 1, "hidden_act": "gelu", "max_position_embeddings": 77}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_start": cfg.linear_start, "beta_end": cfg.linear_end,
         "beta_schedule": "scaled_linear", "num_train_timesteps": cfg.timesteps, "prediction_type": "epsilon"}))
    state = load_state_dict_file(folder, cfg)
    return {"cfg": cfg, "folder": folder, "unet": unet, "vae": vae, "state": state, "oc_text": oc_text}


def test_detects_folder(tiny: dict, fixture_dir: Path) -> None:
    assert is_diffusers_folder(tiny["folder"])
    assert not is_diffusers_folder(fixture_dir / "sd.ckpt")
    assert not is_diffusers_folder(fixture_dir)


def test_state_is_ldm_layout_fp32(tiny: dict) -> None:
    state = tiny["state"]
    tops = {k.split(".")[0] for k in state}
    assert tops == {"model", "first_stage_model", "cond_stage_model", "alphas_cumprod"}, tops
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    # fp16 variant: exactly the stored fp16 values, up-cast.
    w = tiny["vae"].encoder.conv_in.weight
    assert torch.equal(state["first_stage_model.encoder.conv_in.weight"], w.half().float())
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # Linear -> 1x1 conv


@torch.no_grad()
def test_unet_matches_diffusers(tiny: dict) -> None:
    cfg = tiny["cfg"]
    ours = load_unet(tiny["state"], cfg).eval()  # strict load_into inside
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 4, 32, 32, generator=g)
    ctx = torch.randn(2, 77, cfg.unet["context_dim"], generator=g)
    t = torch.tensor([500.0, 500.0])
    ref = tiny["unet"](x, t, encoder_hidden_states=ctx).sample
    got = ours(x, t, ctx)
    err = rel(got, ref)
    log.info("UNet eps vs diffusers: rel err %.2e", err)
    assert err < TOL


@torch.no_grad()
def test_vae_matches_diffusers(tiny: dict) -> None:
    cfg = tiny["cfg"]
    ours = load_vae(tiny["state"], cfg).eval()
    ref_vae = copy.deepcopy(tiny["vae"]).half().float()  # the fp16-rounded weights that were saved
    g = torch.Generator().manual_seed(SEED + 1)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mean_ref = ref_vae.encode(img).latent_dist.mean
    mean = ours.encode_moments(img)[:, : ours.embed_dim]
    z = torch.randn(1, 4, 8, 8, generator=g)
    dec_ref, dec = ref_vae.decode(z).sample, ours.decode(z)
    log.info("VAE vs diffusers: encode mean %.2e, decode %.2e", rel(mean, mean_ref), rel(dec, dec_ref))
    assert rel(mean, mean_ref) < TOL
    assert rel(dec, dec_ref) < TOL


def test_text_encoder_gives_the_penultimate_context(tiny: dict) -> None:
    # The folder holds blocks 0..1 of a 3-block open_clip tower (the last one dropped, as
    # diffusers' SD 2.x conversion does); the converted state must give the same
    # penultimate-layer context as the original open_clip weights.
    got = empty_prompt_context(extract(tiny["state"], "text"))
    ref = empty_prompt_context(tiny["oc_text"])
    assert got.shape == (1, 77, TEXT_WIDTH)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_text_encoder_rejects_quick_gelu() -> None:
    hf = _to_hf_text(_open_clip_text_state(blocks=1), keep_blocks=1)
    with pytest.raises(CheckpointError, match="hidden_act"):
        convert_text_encoder(hf, {"num_hidden_layers": 1, "hidden_act": "quick_gelu"})


def test_schedule_buffer_matches_config(tiny: dict) -> None:
    cfg = tiny["cfg"]
    ours = Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps).alphas_cumprod_f32()
    np.testing.assert_array_equal(tiny["state"]["alphas_cumprod"].numpy(), ours)


def test_load_models_end_to_end(tiny: dict, fixture_dir: Path) -> None:
    # The export entry point, given the folder as --sd (context from the converted text encoder).
    from export.__main__ import load_models

    models = load_models(tiny["cfg"], tiny["folder"], fixture_dir / "lc.ckpt")
    ctx = empty_prompt_context(tiny["oc_text"])
    torch.testing.assert_close(models.null_context.reshape(ctx.shape), ctx, rtol=1e-5, atol=1e-6)
    assert not models.random_init


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_missing_vae_is_a_clear_error(tiny: dict, tmp_path: Path) -> None:
    broken = _copy(tiny["folder"], tmp_path / "novae")
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"lacks 'vae"):
        load_state_dict_file(broken, tiny["cfg"])
    with pytest.raises(CheckpointError, match=r"lacks 'vae/"):
        load_diffusers_folder(broken)  # without a config too


def test_mismatched_config_names_the_fields(tiny: dict, tmp_path: Path) -> None:
    broken = _copy(tiny["folder"], tmp_path / "badcfg")
    path = broken / "unet" / "config.json"
    uc = json.loads(path.read_text())
    uc["cross_attention_dim"] = 1024
    uc["attention_head_dim"] = [5, 10, 20]
    path.write_text(json.dumps(uc))
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(broken, tiny["cfg"])
    msg = str(info.value)
    assert "unet.cross_attention_dim=1024" in msg and "unet.attention_head_dim" in msg, msg


def test_v_prediction_is_refused(tiny: dict, tmp_path: Path) -> None:
    broken = _copy(tiny["folder"], tmp_path / "vpred")
    path = broken / "scheduler" / "scheduler_config.json"
    sc = json.loads(path.read_text())
    sc["prediction_type"] = "v_prediction"
    path.write_text(json.dumps(sc))
    with pytest.raises(CheckpointError, match="prediction_type"):
        load_state_dict_file(broken, tiny["cfg"])


def test_plain_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        load_state_dict_file(tmp_path)
