"""LFGCM: strict loading of lc.ckpt and the symbol path against the golden lfgcm.npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoints import CheckpointError, extract, load_into, load_state_dict_file
from export.config import load_config
from export.models.layers import (
    anchor_mask,
    ckbd_anchor,
    ckbd_anchor_squeeze,
    ckbd_anchor_unsqueeze,
    ckbd_nonanchor,
    ckbd_nonanchor_squeeze,
    ckbd_nonanchor_unsqueeze,
    nonanchor_mask,
)
from export.models.lfgcm import (
    LFGCM,
    LFGCM_CKPT_IGNORE,
    AnchorParams,
    NonAnchorParams,
    build_indexes,
    get_scale_table,
    load_lfgcm,
)

REL_TOL = 1e-4
EXACT = ("z_symbols", "y_symbols", "y_indexes")
FLOAT = ("y", "z", "z_hat", "hyper_params", "y_hat", "f_c", "c_latent")


@pytest.fixture(scope="module")
def lc_state(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(fixture_dir / "lc.ckpt")


@pytest.fixture(scope="module")
def model(fixture_dir: Path, lc_state: dict[str, torch.Tensor]) -> LFGCM:
    return load_lfgcm(lc_state, load_config(fixture_dir / "config.yaml"))


def _ref(fixture_dir: Path, case: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / case / "lfgcm.npz") as d:
        return {k: d[k] for k in d.files}


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.abs(a.detach().numpy() - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module", params=[".", "pad"])
def case(request: pytest.FixtureRequest, fixture_dir: Path, model: LFGCM
         ) -> tuple[str, dict[str, np.ndarray], dict[str, torch.Tensor]]:
    ref = _ref(fixture_dir, request.param)
    out = model.compress_symbols(torch.from_numpy(ref["control"]), torch.from_numpy(ref["z_g"]))
    return request.param, ref, out


# --------------------------------------------------------------------------- loading

def test_strict_load_covers_checkpoint(fixture_dir: Path, lc_state: dict[str, torch.Tensor], model: LFGCM) -> None:
    sub = extract(lc_state, "lfgcm")
    assert len(sub) == 563
    kept = {k for k in sub if not k.startswith(LFGCM_CKPT_IGNORE)}
    assert kept == set(model.state_dict())
    for k in kept:
        assert torch.equal(model.state_dict()[k], sub[k].to(model.state_dict()[k].dtype)), k
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the same call the export uses, with the explicit ignore list
    fresh = LFGCM.from_config(load_config(fixture_dir / "config.yaml"))
    load_into(fresh, sub, "lc.ckpt", ignore=LFGCM_CKPT_IGNORE)


def test_bad_checkpoint_raises(fixture_dir: Path, lc_state: dict[str, torch.Tensor]) -> None:
    cfg = load_config(fixture_dir / "config.yaml")
    missing = {k: v for k, v in lc_state.items() if not k.startswith("preprocess_model.hyper_dec.")}
    with pytest.raises(CheckpointError, match="missing keys"):
        load_lfgcm(missing, cfg)
    wrong = dict(lc_state)
    wrong["preprocess_model.encoder.g_a6.weight"] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_lfgcm(wrong, cfg)


# --------------------------------------------------------------------------- golden values

def test_float_intermediates(case: tuple[str, dict[str, np.ndarray], dict[str, torch.Tensor]]) -> None:
    name, ref, out = case
    for k in FLOAT:
        assert out[k].shape == ref[k].shape, (name, k)
        assert _rel(out[k], ref[k]) < REL_TOL, (name, k, _rel(out[k], ref[k]))


def test_slice_params(case: tuple[str, dict[str, np.ndarray], dict[str, torch.Tensor]]) -> None:
    name, ref, out = case
    keys = [k for k in ref if k.startswith("params_")]
    if name == ".":
        assert len(keys) == 20
    for k in keys:
        assert _rel(out[k], ref[k]) < REL_TOL, (name, k)


def test_symbols_exact(case: tuple[str, dict[str, np.ndarray], dict[str, torch.Tensor]]) -> None:
    name, ref, out = case
    for k in EXACT:
        got = out[k].numpy()
        assert got.dtype == np.int32, k
        assert got.shape == ref[k].shape, (name, k)
        assert np.array_equal(got, ref[k]), (name, k, int(np.count_nonzero(got != ref[k])))


def test_decompress_from_symbols(model: LFGCM,
                                 case: tuple[str, dict[str, np.ndarray], dict[str, torch.Tensor]]) -> None:
    name, ref, out = case
    dec = model.decompress_from_symbols(torch.from_numpy(ref["z_symbols"]), torch.from_numpy(ref["y_symbols"]))
    assert np.array_equal(dec["y_indexes"].numpy(), ref["y_indexes"]), name
    for k in ("z_hat", "y_hat", "c_latent"):
        assert torch.equal(dec[k], out[k]), (name, k)  # same loop both ways: bit-identical
    with pytest.raises(ValueError):
        model.decompress_from_symbols(torch.from_numpy(ref["z_symbols"]), torch.from_numpy(ref["y_symbols"][:-1]))


def test_pad_control_is_zero_padded_input(fixture_dir: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    img = np.asarray(pil.open(fixture_dir / "pad" / "input.png").convert("RGB"))
    h, w = img.shape[:2]
    ctrl = _ref(fixture_dir, "pad")["control"]
    x = torch.tensor(img / 255.0, dtype=torch.float32).clamp_(0, 1).permute(2, 0, 1).numpy()
    assert (h, w) == (120, 180)
    assert np.array_equal(ctrl[0, :, :h, :w], x)
    assert not ctrl[0, :, h:, :].any() and not ctrl[0, :, :, w:].any()


# --------------------------------------------------------------------------- pieces

def test_onnx_wrappers_match(model: LFGCM, case: tuple[str, dict[str, np.ndarray], dict[str, torch.Tensor]]) -> None:
    _, _, out = case
    hp, y_hat = out["hyper_params"], out["y_hat"]
    with torch.no_grad():
        for i in range(model.slice_num):
            a, c = model.slice_start[i], model.slice_ch[i]
            y_prev = y_hat[:, :a] if i else None
            anchor_hat = ckbd_anchor(y_hat[:, a:a + c])
            if i == 0:
                pa, ctx = AnchorParams(model, 0)(hp), None
            else:
                pa, ctx = AnchorParams(model, i)(hp, y_prev)
            pn = NonAnchorParams(model, i)(anchor_hat, hp, ctx) if i else NonAnchorParams(model, 0)(anchor_hat, hp)
            assert torch.equal(pa, out[f"params_anchor_{i}"]), i
            assert torch.equal(pn, out[f"params_nonanchor_{i}"]), i
            pa2, ctx2 = model.anchor_params(i, hp, y_prev)
            assert torch.equal(pa2, pa) and (ctx2 is None) == (i == 0)
            assert torch.equal(model.nonanchor_params(i, anchor_hat, hp, ctx2), pn)


def test_checkerboard_helpers() -> None:
    y = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6) + 1
    am, nm = anchor_mask(4, 6), nonanchor_mask(4, 6)
    assert torch.equal(am + nm, torch.ones(1, 1, 4, 6))
    assert am[0, 0, 0, 1] == 1 and am[0, 0, 1, 0] == 1 and am[0, 0, 0, 0] == 0
    assert torch.equal(ckbd_anchor(y), y * am) and torch.equal(ckbd_nonanchor(y), y * nm)
    sa, sn = ckbd_anchor_squeeze(y), ckbd_nonanchor_squeeze(y)
    assert sa.shape == (1, 2, 4, 3)
    assert sa[0, 0, 0].tolist() == y[0, 0, 0, 1::2].tolist() and sa[0, 0, 1].tolist() == y[0, 0, 1, 0::2].tolist()
    assert sn[0, 0, 0].tolist() == y[0, 0, 0, 0::2].tolist() and sn[0, 0, 1].tolist() == y[0, 0, 1, 1::2].tolist()
    assert torch.equal(ckbd_anchor_unsqueeze(sa) + ckbd_nonanchor_unsqueeze(sn), y)


def test_build_indexes_rule() -> None:
    table = get_scale_table()
    s = torch.tensor([0.0, 0.05, float(table[0]), float(table[0]) * 1.0001, float(table[1]),
                      float(table[62]), float(table[62]) * 1.01, 1e6])
    idx = build_indexes(s, table)
    assert idx.dtype == torch.int32
    assert idx.tolist() == [0, 0, 0, 1, 1, 62, 63, 63]
