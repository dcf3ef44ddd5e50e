"""The PyTorch reference pipeline against the golden fixture (main and pad/ cases): the
project's parity proof, plus the verify_reference CLI and bad-input errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from export.checkpoints import CheckpointError
from export.config import ConfigError
from export.reference import ReferencePipeline, pad_image
from export.verify_reference import SAMPLER_REL_TOL, ddim_step_count, verify
from runtime.sampler import ddim_timesteps

REPO = Path(__file__).resolve().parents[1]
REL_TOL = 1e-4
CASES = [".", "pad"]
LFGCM_FLOAT = ("y", "z", "z_hat", "hyper_params", "y_hat", "f_c", "c_latent")
LFGCM_EXACT = ("z_symbols", "y_symbols", "y_indexes")


def rel_err(got: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    g = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    assert g.shape == ref.shape, (g.shape, ref.shape)
    return float(np.abs(g.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-3))


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def u8_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def pipe(fixture_dir: Path) -> ReferencePipeline:
    return ReferencePipeline.from_fixture(fixture_dir)


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest, fixture_dir: Path, pipe: ReferencePipeline) -> dict:
    folder = fixture_dir / request.param
    image = png(folder / "input.png")
    control, hw = pipe.preprocess(image)
    return {
        "name": request.param, "folder": folder, "image": image, "control": control, "hw": hw,
        "lfgcm": npz(folder / "lfgcm.npz"), "stream": (folder / "stream.bin").read_bytes(),
        "compressed": pipe.compress(control),
    }


# ---------------------------------------------------------------- encoder side


def test_preprocess_matches_official(case: dict) -> None:
    ref = case["lfgcm"]["control"]
    assert case["control"].dtype == torch.float32
    assert np.array_equal(case["control"].numpy(), ref)  # float64 division, one rounding
    assert case["hw"] == case["image"].shape[:2]
    h, w = case["hw"]
    assert ref.shape[2] % 64 == 0 and ref.shape[3] % 64 == 0
    # Padding is zeros at the bottom/right only.
    assert not ref[:, :, h:, :].any() and not ref[:, :, :, w:].any()


def test_preprocess_pads_uint8_first() -> None:
    img = np.full((65, 1, 3), 255, np.uint8)
    padded = pad_image(img)
    assert padded.shape == (128, 64, 3) and padded[:65, :1].min() == 255 and padded[65:].max() == 0
    control, hw = ReferencePipeline.preprocess(img)
    assert control.shape == (1, 3, 128, 64) and hw == (65, 1)
    with pytest.raises(ValueError, match="uint8"):
        ReferencePipeline.preprocess(img.astype(np.float32))


def test_compress_matches_reference(case: dict) -> None:
    out, ref = case["compressed"], case["lfgcm"]
    errs = {k: rel_err(out[k], ref[k]) for k in LFGCM_FLOAT + ("z_g",)}
    errs.update({k: rel_err(out[k], ref[k]) for k in ref if k.startswith("params_")})
    assert all(e <= REL_TOL for e in errs.values()), errs
    for k in LFGCM_EXACT:
        assert np.array_equal(out[k].numpy(), ref[k]), k


def test_stream_bytes_identical(case: dict, pipe: ReferencePipeline) -> None:
    assert case["compressed"]["stream"] == case["stream"]
    assert pipe.encode_image(case["image"]) == case["stream"]


def test_decompress_stream(case: dict, pipe: ReferencePipeline) -> None:
    dec, ref = pipe.decompress(case["stream"]), case["lfgcm"]
    assert np.array_equal(dec["y_symbols"].numpy(), ref["y_symbols"])
    assert np.array_equal(dec["y_indexes"].numpy(), ref["y_indexes"])
    for k in ("z_hat", "hyper_params", "y_hat", "f_c", "c_latent"):
        assert rel_err(dec[k], ref[k]) <= REL_TOL, k


def test_decompress_rejects_damaged_stream(case: dict, pipe: ReferencePipeline) -> None:
    with pytest.raises(ValueError):
        pipe.decompress(case["stream"][:-9])


def test_entropy_tables_exact(fixture_dir: Path, pipe: ReferencePipeline) -> None:
    ref = npz(fixture_dir / "entropy_tables.npz")
    for k, v in ref.items():
        assert pipe.tables[k].dtype == v.dtype and np.array_equal(pipe.tables[k], v), k


def test_vae(fixture_dir: Path, pipe: ReferencePipeline) -> None:
    ref = npz(fixture_dir / "vae.npz")
    control, _ = pipe.preprocess(png(fixture_dir / "input.png"))
    enc = pipe.vae_encode(control)
    assert rel_err(enc["moments"], ref["moments"]) <= REL_TOL
    assert rel_err(enc["z_g"], ref["z_g"]) <= REL_TOL
    assert rel_err(pipe.vae_decode(ref["z_g"]), ref["decoded"]) <= REL_TOL


def test_unet_eps(fixture_dir: Path, pipe: ReferencePipeline) -> None:
    ref = npz(fixture_dir / "unet_eps.npz")
    c_latent = npz(fixture_dir / "lfgcm.npz")["c_latent"]
    for k in range(len(ref["t"])):
        eps = pipe.eps(ref["x_t"][k], int(ref["t"][k]), c_latent)
        assert rel_err(eps, ref["eps"][k]) <= REL_TOL, int(ref["t"][k])


# ---------------------------------------------------------------- samplers, end to end


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_replay(case: dict, pipe: ReferencePipeline, sampler: str) -> None:
    ref = npz(case["folder"] / f"{sampler}.npz")
    stored = [int(t) for t in ref["timesteps"]]
    steps = ddim_step_count(stored, pipe.schedule.num_timesteps) if sampler == "ddim" else len(stored)
    assert steps is not None
    out = pipe.sample(case["lfgcm"]["c_latent"], sampler, steps, ref["x_T"], ref.get("noise"))
    assert out["timesteps"].tolist() == stored
    for k in ("x_steps", "eps_steps", "pred_x0_steps", "samples"):
        if k in ref:
            assert rel_err(out[k], ref[k]) <= SAMPLER_REL_TOL, k
    decoded = pipe.vae_decode(out["samples"])
    if "decoded" in ref:
        assert rel_err(pipe.vae_decode(ref["samples"]), ref["decoded"]) <= REL_TOL
    assert u8_diff(pipe.to_image(decoded), ref["image_u8"]) <= 1
    # Whole decoder: stream.bin -> image, cropped to the input size.
    img = pipe.decode_stream(case["stream"], sampler, steps, ref["x_T"], ref.get("noise"), case["hw"])
    expected = png(case["folder"] / f"output_{sampler}.png")
    assert img.shape == case["image"].shape
    assert u8_diff(img, expected) <= 1


def test_sample_requires_injected_noise(fixture_dir: Path, pipe: ReferencePipeline) -> None:
    ref = npz(fixture_dir / "ddpm.npz")
    c = npz(fixture_dir / "lfgcm.npz")["c_latent"]
    with pytest.raises(ValueError, match="x_T"):
        pipe.sample(c, "ddpm", 4, None)
    with pytest.raises(ValueError, match="noise"):
        pipe.sample(c, "ddpm", 4, ref["x_T"], None)


def test_ddim_step_count_from_timesteps() -> None:
    for s in (1, 4, 6, 7, 50):
        ts = ddim_timesteps(s)[::-1].tolist()
        found = ddim_step_count(ts, 1000)
        assert found is not None and ddim_timesteps(found)[::-1].tolist() == ts
    assert ddim_step_count(ddim_timesteps(6)[::-1].tolist(), 1000) == 6  # 7 timesteps
    assert ddim_step_count([999, 500, 1], 1000) is None


# ---------------------------------------------------------------- bad inputs


def test_wrong_checkpoint_role(fixture_dir: Path) -> None:
    f = fixture_dir
    with pytest.raises(CheckpointError, match="lc checkpoint.*control_model"):
        ReferencePipeline.from_files(f / "sd.ckpt", f / "sd.ckpt", f / "config.yaml", f / "null_context.npy")
    with pytest.raises(CheckpointError, match="SD checkpoint.*model.diffusion_model"):
        ReferencePipeline.from_files(f / "lc.ckpt", f / "lc.ckpt", f / "config.yaml", f / "null_context.npy")


def test_truncated_checkpoint(fixture_dir: Path, tmp_path: Path) -> None:
    data = (fixture_dir / "lc.ckpt").read_bytes()
    bad = tmp_path / "lc.ckpt"
    bad.write_bytes(data[: len(data) // 3])
    f = fixture_dir
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        ReferencePipeline.from_files(f / "sd.ckpt", bad, f / "config.yaml", f / "null_context.npy")


def test_config_missing_keys(fixture_dir: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((fixture_dir / "config.yaml").read_text())
    del raw["params"]["preprocess_config"]["params"]["slice_ch"]
    bad = tmp_path / "config.yaml"
    bad.write_text(yaml.safe_dump(raw))
    f = fixture_dir
    with pytest.raises(ConfigError, match="slice_ch"):
        ReferencePipeline.from_files(f / "sd.ckpt", f / "lc.ckpt", bad, f / "null_context.npy")


def test_config_of_other_size(fixture_dir: Path) -> None:
    f = fixture_dir
    # The paper preset against tiny checkpoints: one error naming the shape mismatches.
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        ReferencePipeline.from_files(f / "sd.ckpt", f / "lc.ckpt", "paper", f / "null_context.npy")


def test_bad_null_context(fixture_dir: Path) -> None:
    f = fixture_dir
    with pytest.raises(ValueError, match="null context"):
        ReferencePipeline.from_files(f / "sd.ckpt", f / "lc.ckpt", f / "config.yaml", np.zeros((1, 77, 3), np.float32))


# ---------------------------------------------------------------- verify_reference CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.verify_reference", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cli_passes_on_fixture(fixture_dir: Path) -> None:
    res = run_cli(str(fixture_dir))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert not any(" FAIL" in line for line in lines)
    stages = {(ln.split()[0], ln.split()[1]) for ln in lines[1:] if ln.split() and ln.split()[0] in CASES}
    for stage in ("tables", "vae", "lfgcm", "stream", "unet_eps", "ddim", "ddpm"):
        assert (".", stage) in stages, stage
    for stage in ("lfgcm", "stream", "ddim", "ddpm"):
        assert ("pad", stage) in stages, stage


def _weights_only_copy(fixture_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.yaml", "sd.ckpt", "lc.ckpt", "null_context.npy"):
        (dst / name).symlink_to(fixture_dir / name)
    return dst


def test_cli_fails_on_corrupted_value(fixture_dir: Path, tmp_path: Path) -> None:
    folder = _weights_only_copy(fixture_dir, tmp_path / "fx")
    shutil.copy(fixture_dir / "input.png", folder / "input.png")
    vae = npz(fixture_dir / "vae.npz")
    vae["z_g"] = vae["z_g"].copy()
    vae["z_g"][0, 1, 2, 3] += 0.5
    np.savez(folder / "vae.npz", **vae)
    lf = npz(fixture_dir / "lfgcm.npz")
    lf["y_symbols"] = lf["y_symbols"].copy()
    lf["y_symbols"][7] += 1
    np.savez(folder / "lfgcm.npz", **lf)
    res = run_cli(str(folder), "--stage", "vae", "--stage", "lfgcm")
    assert res.returncode == 1, res.stdout + res.stderr
    failed = {tuple(ln.split()[1:3]) for ln in res.stdout.splitlines() if " FAIL" in ln}
    # decoded is computed from the file's (corrupted) z_g, so it fails too.
    assert failed == {("vae", "z_g"), ("vae", "decoded"), ("lfgcm", "y_symbols")}, res.stdout
    # The same folder through the API, compact report: one line per stage.
    res = run_cli(str(folder), "--steps-only", "--stage", "vae")
    assert res.returncode == 1 and sum(" FAIL" in ln for ln in res.stdout.splitlines()) == 1, res.stdout


def test_cli_unusable_folders(fixture_dir: Path, tmp_path: Path) -> None:
    folder = _weights_only_copy(fixture_dir, tmp_path / "noconfig")
    (folder / "config.yaml").unlink()
    shutil.copy(fixture_dir / "vae.npz", folder / "vae.npz")
    res = run_cli(str(folder))
    assert res.returncode == 2 and "config.yaml" in res.stderr, res.stderr
    res = run_cli(str(tmp_path / "does-not-exist"))
    assert res.returncode == 2 and "not a directory" in res.stderr
    # A truncated checkpoint: the model cannot be loaded at all.
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for name in ("config.yaml", "lc.ckpt", "null_context.npy", "vae.npz"):
        (trunc / name).symlink_to(fixture_dir / name)
    (trunc / "sd.ckpt").write_bytes((fixture_dir / "sd.ckpt").read_bytes()[:1000])
    res = run_cli(str(trunc))
    assert res.returncode == 2 and "unreadable checkpoint" in res.stderr, res.stderr


def test_verify_only_present_stages(fixture_dir: Path, tmp_path: Path) -> None:
    # A sub-case with only a sampler file uses the parent's weights and checks just that.
    folder = _weights_only_copy(fixture_dir, tmp_path / "fx")
    sub = folder / "sub" / "deeper"
    sub.mkdir(parents=True)
    shutil.copy(fixture_dir / "lfgcm.npz", sub / "lfgcm.npz")
    checks = verify(folder, ["lfgcm", "ddim"])
    assert checks and all(c.passed for c in checks)
    assert {c.case for c in checks} == {"sub/deeper"} and {c.stage for c in checks} == {"lfgcm"}
