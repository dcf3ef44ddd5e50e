"""Tests of runtime/sampler.py against the official DiffEIC golden fixtures, without any model.

The recorded eps (and, for DDPM, the recorded noise) are fed back into the
numpy samplers starting from the recorded x_T; every intermediate latent,
the coefficient arrays and the uint8 post-processing are compared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    # Lets `pytest tests/test_sampler.py` work without an installed package.
    sys.path.insert(0, str(_REPO))

from runtime.sampler import (  # noqa: E402
    DDIMSampler,
    GaussianNoise,
    ReplayNoise,
    Sampler,
    Schedule,
    SpacedDDPMSampler,
    ddim_timesteps,
    make_sampler,
    run,
    space_timesteps,
    to_uint8_image,
    torch_linspace_f64,
    valid_ddim_steps,
)

FIXTURE = Path(
    os.environ.get(
        "DIFFEIC_FIXTURE",
        str(Path(__file__).resolve().parents[2] / "shared/fixtures/diffeic-ref-tiny"),
    )
)
CASES = ["", "pad"]

needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "ddim.npz").is_file(), reason=f"golden fixture not found at {FIXTURE}"
)


def _load(case: str, name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURE / case / name) as data:
        return {k: data[k] for k in data.files}


def _close(actual: np.ndarray, ref: np.ndarray, rel: float = 1e-6) -> None:
    """Agreement relative to the reference's largest magnitude (a few float32 ulps)."""
    assert actual.dtype == np.float32
    assert actual.shape == ref.shape
    scale = float(np.max(np.abs(ref))) or 1.0
    err = float(np.max(np.abs(actual.astype(np.float64) - ref.astype(np.float64))))
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} * {scale:.3g}"


# --------------------------------------------------------------------------- schedule


def test_schedule_defaults_and_dtypes() -> None:
    s = Schedule()
    assert (s.linear_start, s.linear_end, s.num_timesteps) == (0.00085, 0.012, 1000)
    assert s.betas().dtype == np.float64 and s.betas().shape == (1000,)
    assert s.alphas_cumprod().dtype == np.float64
    acp = s.alphas_cumprod_f32()
    assert acp.dtype == np.float32
    assert acp[0] == np.float32(1 - 0.00085)  # 0.99915, DDIM's alphas_prev[0]
    np.testing.assert_array_equal(acp, s.alphas_cumprod().astype(np.float32))


def test_linspace_matches_formula() -> None:
    a, b = 0.00085**0.5, 0.012**0.5
    lin = torch_linspace_f64(a, b, 1000)
    assert lin[0] == a and lin[-1] == b
    np.testing.assert_allclose(lin, np.linspace(a, b, 1000), rtol=1e-15, atol=0)
    np.testing.assert_array_equal(torch_linspace_f64(a, b, 1), [a])


@needs_fixture
def test_schedule_matches_checkpoint_buffers() -> None:
    """alphas_cumprod_f32 / betas equal sd.ckpt's float32 buffers (needs torch to read the ckpt)."""
    torch = pytest.importorskip("torch")
    sd = torch.load(FIXTURE / "sd.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    s = Schedule()
    np.testing.assert_array_equal(sd["alphas_cumprod"].numpy(), s.alphas_cumprod_f32())
    np.testing.assert_array_equal(sd["betas"].numpy(), s.betas().astype(np.float32))
    ref = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).numpy()
    np.testing.assert_array_equal(ref, s.betas())


def test_sampler_module_imports_no_torch() -> None:
    code = (
        "import sys; sys.path.insert(0, %r); import runtime.sampler; "
        "assert 'torch' not in sys.modules, 'torch imported'" % str(_REPO)
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- DDPM


@needs_fixture
@pytest.mark.parametrize("case", CASES)
def test_ddpm_replay(case: str) -> None:
    d = _load(case, "ddpm.npz")
    sampler = make_sampler("ddpm", 4)
    assert isinstance(sampler, SpacedDDPMSampler) and isinstance(sampler, Sampler)
    assert sampler.needs_noise()
    assert sampler.timesteps.dtype == np.int64
    np.testing.assert_array_equal(sampler.timesteps, d["timesteps"])  # 999, 666, 333, 0
    np.testing.assert_allclose(sampler.betas, d["betas"], rtol=1e-15, atol=0)
    np.testing.assert_allclose(
        sampler.posterior_variance, d["posterior_variance"], rtol=1e-15, atol=1e-300
    )

    np.testing.assert_array_equal(d["x_steps"][0], d["x_T"])
    x = d["x_T"]
    for i in range(len(sampler.timesteps)):
        x = sampler.step(i, x, d["eps_steps"][i], d["noise"][i])
        _close(x, d["x_steps"][i + 1])
    _close(x, d["samples"])


@needs_fixture
@pytest.mark.parametrize("case", CASES)
def test_ddpm_run_loop_with_replay_noise(case: str) -> None:
    d = _load(case, "ddpm.npz")
    sampler = make_sampler("ddpm", 4)
    noise = ReplayNoise.from_npz(FIXTURE / case / "ddpm.npz")
    x_T = noise.initial(d["x_T"].shape)
    lookup = {int(t): d["eps_steps"][k] for k, t in enumerate(d["timesteps"])}
    seen: list[int] = []

    def model_fn(x: np.ndarray, t: int) -> np.ndarray:
        k = len(seen)
        _close(x, d["x_steps"][k])  # the model sees the latent entering step k
        return lookup[t]

    def callback(i: int, t: int, x: np.ndarray, eps: np.ndarray) -> None:
        seen.append(t)

    out = run(sampler, x_T, model_fn, noise, callback)
    assert seen == d["timesteps"].tolist()
    _close(out, d["samples"])


def test_ddpm_last_step_masks_noise() -> None:
    sampler = make_sampler("ddpm", 4)
    x = np.ones((1, 4, 2, 2), np.float32)
    eps = np.full_like(x, 0.5)
    last = len(sampler.timesteps) - 1
    assert sampler.coefficients(last)["noise_mask"] == 0
    a = sampler.step(last, x, eps, np.full_like(x, 1e6))
    b = sampler.step(last, x, eps, None)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        sampler.step(0, x, eps, None)


def test_space_timesteps_rules() -> None:
    assert sorted(space_timesteps(1000, "4")) == [0, 333, 666, 999]
    assert sorted(space_timesteps(1000, "1")) == [0]
    assert len(space_timesteps(1000, "50")) == 50
    assert make_sampler("ddpm", 1).timesteps.tolist() == [0]
    with pytest.raises(ValueError):
        make_sampler("ddpm", 0)
    with pytest.raises(ValueError):
        make_sampler("ddpm", 1001)


# --------------------------------------------------------------------------- DDIM


@needs_fixture
@pytest.mark.parametrize("case", CASES)
def test_ddim_replay(case: str) -> None:
    d = _load(case, "ddim.npz")
    sampler = make_sampler("ddim", 4)
    assert isinstance(sampler, DDIMSampler) and isinstance(sampler, Sampler)
    assert not sampler.needs_noise()
    np.testing.assert_array_equal(sampler.timesteps, d["timesteps"])  # 751, 501, 251, 1
    for key in ("ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas"):
        got = getattr(sampler, key)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, d[key], err_msg=key)
    # Coefficients are indexed by step index; sampling step i uses index n-1-i.
    c0 = sampler.coefficients(0)
    assert c0["a_t"] == d["ddim_alphas"][-1] and c0["a_prev"] == d["ddim_alphas_prev"][-1]

    x = d["x_T"]
    for i in range(len(sampler.timesteps)):
        x_next, pred_x0 = sampler.step_with_x0(i, x, d["eps_steps"][i])
        _close(pred_x0, d["pred_x0_steps"][i])
        np.testing.assert_array_equal(sampler.step(i, x, d["eps_steps"][i], None), x_next)
        _close(x_next, d["x_steps"][i + 1])
        x = x_next
    _close(x, d["samples"])


@needs_fixture
@pytest.mark.parametrize("case", CASES)
def test_ddim_run_loop(case: str) -> None:
    d = _load(case, "ddim.npz")
    sampler = make_sampler("ddim", 4)
    lookup = {int(t): d["eps_steps"][k] for k, t in enumerate(d["timesteps"])}
    out = run(sampler, d["x_T"], lambda x, t: lookup[t])
    _close(out, d["samples"])


def test_ddim_step_count_rule() -> None:
    # range(0, 1000, 1000 // S) + 1, walked in reverse.
    assert make_sampler("ddim", 4).timesteps.tolist() == [751, 501, 251, 1]
    assert len(make_sampler("ddim", 6).timesteps) == 7
    assert len(make_sampler("ddim", 7).timesteps) == 8
    assert make_sampler("ddim", 1).timesteps.tolist() == [1]
    assert ddim_timesteps(50).tolist() == list(range(1, 1000, 20))
    with pytest.raises(ValueError, match="Valid nearby choices"):
        make_sampler("ddim", 3)  # 1, 334, 667, 1000: official IndexError
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError):
            make_sampler("ddim", bad)
    valid = valid_ddim_steps()
    assert 3 not in valid and 4 in valid and 6 in valid
    for s in valid[:40]:
        assert int(ddim_timesteps(s)[-1]) < 1000


# --------------------------------------------------------------------------- factory and noise


def test_bad_sampler_name() -> None:
    with pytest.raises(ValueError, match="ddpm, ddim"):
        make_sampler("euler", 4)


def test_replay_noise_mismatch() -> None:
    shape = (1, 4, 16, 24)
    x_T = np.zeros(shape, np.float32)
    ddpm = make_sampler("ddpm", 4)
    ReplayNoise(x_T, np.zeros((4, *shape), np.float32)).check(ddpm, shape)
    with pytest.raises(ValueError):
        ReplayNoise(x_T, np.zeros((3, *shape), np.float32)).check(ddpm, shape)  # count
    with pytest.raises(ValueError):
        ReplayNoise(x_T, np.zeros((4, 1, 4, 8, 8), np.float32)).check(ddpm, shape)  # shape
    with pytest.raises(ValueError):
        ReplayNoise(x_T, None).check(ddpm, shape)  # DDPM needs noise
    with pytest.raises(ValueError):
        ReplayNoise(x_T).check(ddpm, (1, 4, 8, 8))  # x_T shape
    with pytest.raises(ValueError):
        run(ddpm, x_T, lambda x, t: x, ReplayNoise(x_T, np.zeros((5, *shape), np.float32)))
    # DDIM reads no noise, so none is required.
    ReplayNoise(x_T).check(make_sampler("ddim", 4), shape)


def test_gaussian_noise_is_seeded_and_ordered() -> None:
    shape = (1, 4, 2, 3)
    a, b = GaussianNoise(7), GaussianNoise(7)
    xa, xb = a.initial(shape), b.initial(shape)
    assert xa.dtype == np.float32
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(
        xa, np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    )
    np.testing.assert_array_equal(a.step_noise(0, shape), b.step_noise(0, shape))
    with pytest.raises(RuntimeError):
        a.step_noise(5, shape)
    sampler = make_sampler("ddpm", 3)
    out = run(sampler, GaussianNoise(1).initial(shape), lambda x, t: np.zeros_like(x), GaussianNoise(2))
    assert out.dtype == np.float32 and out.shape == shape and np.all(np.isfinite(out))


# --------------------------------------------------------------------------- image


@needs_fixture
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["ddim.npz", "ddpm.npz"])
def test_to_uint8_image(case: str, name: str) -> None:
    d = _load(case, name)
    if "decoded" not in d:
        pytest.skip(f"{case or 'main'}/{name} has no float 'decoded' array (lite case)")
    img = to_uint8_image(d["decoded"])
    assert img.dtype == np.uint8 and img.shape == d["image_u8"].shape
    np.testing.assert_array_equal(img, d["image_u8"])


def test_to_uint8_image_truncates() -> None:
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32).reshape(1, 1, 1, 6)
    x = np.repeat(x, 3, axis=1)
    img = to_uint8_image(x)
    assert img.shape == (1, 6, 3)
    # (0+1)/2*255 = 127.5 -> 127 (truncation, not rounding)
    assert img[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
    with pytest.raises(ValueError):
        to_uint8_image(np.zeros((3, 4, 4), np.float32))
