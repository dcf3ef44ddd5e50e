"""SD/DiffEIC network ports (export/models/{blocks,unet,vae,sd,text}.py) against the golden fixture."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoints import CheckpointError, extract, load_state_dict_file
from export.config import load_config
from export.models import blocks
from export.models.sd import load_control, load_controlled_unet, load_unet, load_vae
from export.models.text import empty_prompt_context, empty_prompt_tokens
from export.models.unet import ControlledUNet

log = logging.getLogger(__name__)
TOL = 1e-4


def rel_err(got: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def fx(fixture_dir: Path) -> dict:
    cfg = load_config(fixture_dir / "config.yaml")
    return {
        "cfg": cfg,
        "sd": load_state_dict_file(fixture_dir / "sd.ckpt"),
        "lc": load_state_dict_file(fixture_dir / "lc.ckpt"),
        "vae": dict(np.load(fixture_dir / "vae.npz")),
        "lfgcm": dict(np.load(fixture_dir / "lfgcm.npz")),
        "unet": dict(np.load(fixture_dir / "unet_eps.npz")),
        "ctx": torch.from_numpy(np.load(fixture_dir / "null_context.npy")),
    }


@pytest.fixture(scope="module")
def model(fx: dict) -> ControlledUNet:
    return load_controlled_unet(fx["sd"], fx["lc"], fx["cfg"])


def _case(fx: dict, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = fx["unet"]
    return (
        torch.from_numpy(u["x_t"][k]),
        torch.tensor([int(u["t"][k])], dtype=torch.long),
        torch.from_numpy(fx["lfgcm"]["c_latent"]),
    )


# ---------------------------------------------------------------- VAE


def test_vae_matches_reference(fx: dict) -> None:
    vae = load_vae(fx["sd"], fx["cfg"])
    ref = fx["vae"]
    x = torch.from_numpy(fx["lfgcm"]["control"]) * 2 - 1
    with torch.no_grad():
        moments = vae.encode_moments(x)
        z_g = vae.encode_mode_scaled(x)
        decoded = vae.decode_scaled(torch.from_numpy(ref["z_g"]))
    errs = {
        "moments": rel_err(moments, ref["moments"]),
        "z_g": rel_err(z_g, ref["z_g"]),
        "decoded": rel_err(decoded, ref["decoded"]),
    }
    log.info("VAE relative errors: %s", errs)
    assert float(ref["scale_factor"]) == np.float32(fx["cfg"].scale_factor)
    assert all(e < TOL for e in errs.values()), errs


# ---------------------------------------------------------------- UNet + control


@pytest.mark.parametrize("k", [0, 1, 2])
def test_controlled_unet_eps(fx: dict, model: ControlledUNet, k: int) -> None:
    x, t, c = _case(fx, k)
    with torch.no_grad():
        eps = model(x, t, c, fx["ctx"])
    err = rel_err(eps, fx["unet"]["eps"][k])
    log.info("eps t=%d relative error %.3g", int(t), err)
    assert err < TOL


def _official_interleaved(m: ControlledUNet, x, t, hint, context) -> torch.Tensor:
    """CDDM.forward written the official way (both branches stepped together)."""
    unet, ctl = m.unet, m.control
    cm = ctl.control_model
    t_emb = blocks.timestep_embedding(t, unet.model_channels)
    emb, emb_base = cm.time_embed(t_emb), unet.time_embed(t_emb)
    h_base, h_ctr = x, torch.cat((x, hint), dim=1)
    hs_base, hs_ctr = [], []
    scales = iter(ctl.scale_list)
    for mb, mc, zc in zip(unet.input_blocks, cm.input_blocks, ctl.enc_zero_convs_out):
        h_base = mb(h_base, emb_base, context)
        h_ctr = mc(h_ctr, emb, context)
        h_base = h_base + zc(h_ctr, emb) * next(scales)
        hs_base.append(h_base)
        hs_ctr.append(h_ctr)
    h_base = unet.middle_block(h_base, emb_base, context)
    h_ctr = cm.middle_block(h_ctr, emb, context)
    h_base = h_base + ctl.middle_block_out(h_ctr, emb) * next(scales)
    for mb, zc in zip(unet.output_blocks, ctl.dec_zero_convs_out):
        h_base = h_base + zc(hs_ctr.pop(), emb) * next(scales)
        h_base = mb(torch.cat([h_base, hs_base.pop()], dim=1), emb_base, context)
    return unet.out(h_base)


def test_split_equals_interleaved(fx: dict, model: ControlledUNet) -> None:
    x, t, c = _case(fx, 1)
    with torch.no_grad():
        residuals = model.control(x, t, c, fx["ctx"])
        split = model.unet(x, t, fx["ctx"], residuals)
        merged = model(x, t, c, fx["ctx"])
        inter = _official_interleaved(model, x, t, c, fx["ctx"])
    assert len(residuals) == model.unet.num_residuals == 19
    assert torch.equal(split, merged)
    assert torch.equal(split, inter)


def test_fold_context(fx: dict) -> None:
    m = load_controlled_unet(fx["sd"], fx["lc"], fx["cfg"])
    x, t, c = _case(fx, 0)
    x2 = torch.cat([x, torch.from_numpy(fx["unet"]["x_t"][2])])
    t2 = torch.tensor([999, 1])
    c2 = c.expand(2, -1, -1, -1)
    ctx = fx["ctx"]
    with torch.no_grad():
        before = m(x2, t2, c2, ctx.expand(2, -1, -1))
        m.fold_context(ctx)
        after = m(x2, t2, c2)
    n_folded = sum(1 for mod in m.modules() if isinstance(mod, blocks.CrossAttention) and mod.folded)
    assert n_folded == (4 + 1 + 6) + (4 + 1)  # base: enc, mid, dec; control: enc, mid
    assert float((after - before).abs().max()) <= 1e-6
    assert rel_err(after[:1], fx["unet"]["eps"][0]) < TOL


def test_batch_consistency(fx: dict, model: ControlledUNet) -> None:
    """A batch of 2 gives each item's single-batch result (the export graphs are batched)."""
    x0, t0, c = _case(fx, 0)
    x2, t2, _ = _case(fx, 2)
    with torch.no_grad():
        both = model(torch.cat([x0, x2]), torch.cat([t0, t2]), c.expand(2, -1, -1, -1), fx["ctx"].expand(2, -1, -1))
    assert rel_err(both[:1], fx["unet"]["eps"][0]) < TOL
    assert rel_err(both[1:], fx["unet"]["eps"][2]) < TOL


@pytest.mark.parametrize("variant", [
    {"use_linear_in_transformer": False},
    {"num_heads": 2, "num_head_channels": -1},
])
def test_variants_random_weights(fx: dict, variant: dict) -> None:
    """Conv proj_in/out and fixed-head-count layouts build, run, fold and split consistently."""
    from export.models.unet import ControlModule, UNetModel

    cfg = fx["cfg"]
    torch.manual_seed(0)
    m = ControlledUNet(UNetModel({**cfg.unet, **variant}), ControlModule({**cfg.control, **variant})).eval()
    if not variant.get("use_linear_in_transformer", True):
        assert isinstance(m.unet.input_blocks[1][1].proj_in, torch.nn.Conv2d)
    x, t, c = _case(fx, 1)
    with torch.no_grad():
        ref = _official_interleaved(m, x, t, c, fx["ctx"])
        out = m(x, t, c, fx["ctx"])
        m.fold_context(fx["ctx"])
        folded = m(x, t, c)
    assert torch.equal(out, ref)
    assert float((folded - out).abs().max()) <= 1e-6


def test_control_module_sizes(model: ControlledUNet) -> None:
    """find_denominator rules of model/diffeic.py at the tiny control width 6 / 12."""
    cm = model.control.control_model
    assert cm.model_channels == 6 and cm.base_model_channels == 32
    rb = cm.input_blocks[1][0]
    assert rb.in_layers[0].num_groups == 6 and rb.in_layers[0].eps == 1e-5
    st = cm.input_blocks[1][1]
    attn = st.transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (1, 6)
    assert st.norm.num_groups == 6 and st.norm.eps == 1e-6
    st4 = cm.input_blocks[4][1]
    assert (st4.transformer_blocks[0].attn1.heads, st4.transformer_blocks[0].attn1.dim_head) == (2, 6)
    mid = cm.middle_block[1].transformer_blocks[0].attn1
    assert (mid.heads, mid.dim_head) == (2, 6)  # carries find_denominator(12, 8) = 6
    assert cm.middle_block[0].in_layers[0].num_groups == 12
    base_attn = model.unet.input_blocks[1][1].transformer_blocks[0].attn1
    assert (base_attn.heads, base_attn.dim_head) == (2, 16)
    assert model.unet.input_blocks[1][0].in_layers[0].num_groups == 32


def test_timestep_embedding_formula() -> None:
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    dim = 32
    half = dim // 2
    ref = np.zeros((4, dim))
    for i, tv in enumerate(t.tolist()):
        for k in range(half):
            f = math.exp(-math.log(10000.0) * k / half)
            ref[i, k], ref[i, half + k] = math.cos(tv * f), math.sin(tv * f)
    got = blocks.timestep_embedding(t, dim).numpy()
    assert np.abs(got - ref).max() < 2e-4  # float32 args at t ~ 1e3


def test_find_denominator() -> None:
    assert blocks.find_denominator(6, 32) == 6
    assert blocks.find_denominator(12, 8) == 6
    assert blocks.find_denominator(64, 32) == 32
    assert blocks.find_denominator(320, 32) == 32
    assert blocks.find_denominator(1280, 16) == 16


def test_paper_sizes() -> None:
    """The paper config builds SD 2.1's UNet (865,910,724 parameters); meta device, no memory."""
    from export.models.unet import ControlModule, UNetModel

    cfg = load_config("paper")
    with torch.device("meta"):
        unet, control = UNetModel(cfg.unet), ControlModule(cfg.control)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert control.control_model.model_channels == 64
    assert control.scale_list.shape == (25,)  # 12 input blocks + mid + 12 output blocks


# ---------------------------------------------------------------- strict loading


def test_wrong_checkpoint_raises(fx: dict) -> None:
    cfg = fx["cfg"]
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model"):
        load_unet(fx["lc"], cfg)  # lc.ckpt given as the SD checkpoint
    with pytest.raises(CheckpointError, match=r"first_stage_model"):
        load_vae(fx["lc"], cfg)
    with pytest.raises(CheckpointError, match=r"control_model"):
        load_control(fx["sd"], cfg)  # SD checkpoint given as lc.ckpt


def test_config_mismatch_raises(fx: dict) -> None:
    cfg = fx["cfg"]
    wider = dataclasses.replace(cfg, unet={**cfg.unet, "context_dim": 128})
    with pytest.raises(CheckpointError, match="shape mismatches.*attn2.to_k"):
        load_unet(fx["sd"], wider)
    deeper = dataclasses.replace(cfg, unet={**cfg.unet, "channel_mult": [1, 2, 2, 2]})
    with pytest.raises(CheckpointError, match="missing keys"):
        load_unet(fx["sd"], deeper)
    broken = dict(fx["lc"])
    broken.pop("control_model.scale_list")
    with pytest.raises(CheckpointError, match="scale_list"):
        load_control(broken, fx["cfg"])


# ---------------------------------------------------------------- export smoke


def test_onnx_export_folded(fx: dict, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    m = load_controlled_unet(fx["sd"], fx["lc"], fx["cfg"])
    m.fold_context(fx["ctx"])
    x, _, c = _case(fx, 0)
    t = torch.tensor([999.0])
    path = tmp_path / "unet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but fast
        torch.onnx.export(m, (x, t, c), str(path), opset_version=18, dynamo=False,
                          input_names=["x_t", "t", "c_latent"], output_names=["eps"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    eps = sess.run(None, {"x_t": x.numpy(), "t": t.numpy(), "c_latent": c.numpy()})[0]
    assert rel_err(eps, fx["unet"]["eps"][0]) < TOL


# ---------------------------------------------------------------- text encoder (random weights)


def _random_text_state(width: int = 128, layers: int = 3, length: int = 77, vocab: int = 49408) -> dict:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, s: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    st = {
        "model.token_embedding.weight": r(vocab, width, s=0.5),
        "model.positional_embedding": r(length, width, s=0.5),
        "model.ln_final.weight": 1 + r(width), "model.ln_final.bias": r(width),
        "model.text_projection": r(width, width), "model.logit_scale": torch.tensor(4.6),
    }
    for i in range(layers):
        p = f"model.transformer.resblocks.{i}."
        st |= {
            p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
            p + "attn.in_proj_weight": r(3 * width, width, s=0.2), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width, s=0.2), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
            p + "mlp.c_fc.weight": r(4 * width, width, s=0.2), p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width, s=0.2), p + "mlp.c_proj.bias": r(width),
        }
    return st


def test_empty_prompt_context_random_weights() -> None:
    """Against an independent nn.MultiheadAttention build (open_clip's layout). Unverified
    against real OpenCLIP weights."""
    width, layers, heads = 128, 3, 2
    st = _random_text_state(width, layers)
    got = empty_prompt_context(extract({f"cond_stage_model.{k}": v for k, v in st.items()}, "text"))
    assert got.shape == (1, 77, width)

    tokens = empty_prompt_tokens()
    assert tokens[0, :3].tolist() == [49406, 49407, 0]
    x = st["model.token_embedding.weight"][tokens] + st["model.positional_embedding"]
    mask = torch.triu(torch.full((77, 77), float("-inf")), 1)
    with torch.no_grad():
        for i in range(layers - 1):  # penultimate: the last block is skipped
            p = f"model.transformer.resblocks.{i}."
            mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
            mha.in_proj_weight.copy_(st[p + "attn.in_proj_weight"])
            mha.in_proj_bias.copy_(st[p + "attn.in_proj_bias"])
            mha.out_proj.weight.copy_(st[p + "attn.out_proj.weight"])
            mha.out_proj.bias.copy_(st[p + "attn.out_proj.bias"])
            ln1 = torch.nn.functional.layer_norm(x, (width,), st[p + "ln_1.weight"], st[p + "ln_1.bias"])
            x = x + mha(ln1, ln1, ln1, attn_mask=mask, need_weights=False)[0]
            ln2 = torch.nn.functional.layer_norm(x, (width,), st[p + "ln_2.weight"], st[p + "ln_2.bias"])
            fc = torch.nn.functional.gelu(ln2 @ st[p + "mlp.c_fc.weight"].T + st[p + "mlp.c_fc.bias"])
            x = x + fc @ st[p + "mlp.c_proj.weight"].T + st[p + "mlp.c_proj.bias"]
        ref = torch.nn.functional.layer_norm(x, (width,), st["model.ln_final.weight"], st["model.ln_final.bias"])
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
