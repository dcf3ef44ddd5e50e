"""Tiled VAE decoding/encoding and the memory budget (runtime/tiling.py, export/memory.py).

Tolerances: the tile layout and blending are exact (a pointwise "network" gives the untiled
result to float32 rounding). The SD VAE is not pointwise (GroupNorm statistics and the
mid-block attention see one tile), so tiled output differs from untiled output; on the
tiny fixture VAE with RANDOM weights and 256 px tiles of a 256x384 image the measured
difference is 27.4 dB PSNR (max 1.5 on a [-1, 1] scale) for decoding and 16 % of the
largest latent value for encoding; the tests require 25 dB and 25 %. A trained VAE at the
default 512-1024 px tiles is expected to be far closer (not measurable here: no weights).
Seams: no column or row of a tiled decode changes more from its neighbour than 1.5x the
same change in the untiled decode.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.config import defaults
from runtime.manifest import load_manifest
from runtime.pipeline import Codec
from runtime.tiling import (
    MAX_AUTO_TILE,
    MIN_TILE,
    RUNTIME_OVERHEAD,
    MemoryBudgetError,
    axis_starts,
    decode_tiled,
    encode_tiled,
    estimate_stage_bytes,
    parse_memory,
    parse_tile,
    plan_vae,
    tile_grid,
)

REPO = Path(__file__).resolve().parents[1]
DECODE_PSNR_DB = 25.0
ENCODE_REL = 0.25
SEAM_RATIO = 1.5


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 600), st.integers(8, 160), st.sampled_from([1, 8]))
def test_axis_starts_cover_with_equal_overlapping_tiles(length: int, tile: int, align: int) -> None:
    tile = max(align, tile // align * align)
    length = length if length <= tile else tile + (length - tile) // align * align
    overlap = tile // 4 // align * align
    starts = axis_starts(length, tile, overlap, align)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length  # first pixel to last
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= tile - overlap + align for a, b in zip(starts, starts[1:]))  # overlap kept
    assert all(b > a for a, b in zip(starts, starts[1:]))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered.all()


def _pointwise_decoder(z: np.ndarray) -> np.ndarray:
    """A stand-in VAE decoder acting pixel by pixel: 8x nearest upsampling of a pointwise map."""
    y = np.tanh(z[:, :3] * 0.7 + z[:, 3:4])
    return np.repeat(np.repeat(y, 8, axis=2), 8, axis=3)


@pytest.mark.parametrize("hw, tile", [((24, 40), 128), ((64, 64), 256), ((17 * 8, 9 * 8), 192), ((8, 80), 128)])
def test_blending_is_exact_for_a_pointwise_network(hw: tuple[int, int], tile: int) -> None:
    z = np.random.default_rng(1).standard_normal((1, 4) + hw).astype(np.float32)
    got = decode_tiled(_pointwise_decoder, z, tile)
    assert tile_grid(*hw, tile // 8).count > 1 or max(hw) * 8 <= tile
    np.testing.assert_allclose(got, _pointwise_decoder(z), rtol=0, atol=2e-7)
    img = np.random.default_rng(2).random((1, 3, 8 * hw[0], 8 * hw[1])).astype(np.float32)
    enc = lambda t: np.concatenate([t[:, :, ::8, ::8], t[:, :1, 4::8, 4::8]], axis=1)  # noqa: E731
    np.testing.assert_allclose(encode_tiled(enc, img, tile, 4), enc(img), rtol=0, atol=2e-7)


def test_bad_tiles_and_budgets_are_clear_errors() -> None:
    for bad in ("100", "64", "abc", "0"):
        with pytest.raises(ValueError, match="multiple of 64|auto, off"):
            parse_tile(bad)
    assert parse_tile("auto") == 0 and parse_tile("off") == -1 and parse_tile("512") == 512
    assert parse_memory("8G") == 8192 and parse_memory("6000M") == 6000 and parse_memory("auto") == 0
    for bad in ("lots", "12Q", "100M"):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_memory(bad)
    with pytest.raises(ValueError, match="tile must be a multiple of 64"):
        defaults().with_(tile=96)
    with pytest.raises(ValueError, match="max_memory_mb"):
        defaults().with_(max_memory_mb=-1)


# --------------------------------------------------------------------------- the budget


@pytest.fixture(scope="module")
def manifest(fixture_artifacts: Path):  # type: ignore[no-untyped-def]
    return load_manifest(fixture_artifacts)[0]


def test_memory_models_are_in_the_manifest(manifest) -> None:  # type: ignore[no-untyped-def]
    for name, e in manifest.networks.items():
        assert e.memory and e.memory["weights"] > 0 and e.memory["unknown_tensors"] <= 2, name
        a = [e.activation_bytes(s * s) for s in (64, 512, 4096)]
        assert a[0] < a[1] < a[2], name
    vae = manifest.networks["vae_decoder"]
    # the mid-block attention makes the VAE grow with the square of the pixels at large sizes
    assert vae.activation_bytes(4096**2) / vae.activation_bytes(2048**2) > 10
    assert 1.0 <= vae.activation_bytes(1000 * 1000) / vae.activation_bytes(992 * 992) < 1.1  # interpolation


def test_plan_vae_tiles_above_the_budget_and_refuses_what_cannot_fit(manifest) -> None:  # type: ignore[no-untyped-def]
    loaded = ["control_unet", "vae_decoder", "content_decoder", "hyper_decoder"]
    fixed = ["content_decoder"]
    big = 64 << 30
    assert plan_vae(manifest, "vae_decoder", "vae_decoder", (512, 512), big, 0, fixed, loaded).tile == 0
    p = plan_vae(manifest, "vae_decoder", "vae_decoder", (2048, 2048), 4 << 30, 0, fixed, loaded)
    assert p.tile >= MIN_TILE and p.tile % 64 == 0 and p.estimate_bytes <= 4 << 30
    assert plan_vae(manifest, "vae_decoder", "vae_decoder", (2048, 2048), 4 << 30, 256, fixed, loaded).tile == 256
    assert plan_vae(manifest, "vae_decoder", "vae_decoder", (2048, 2048), big, -1, fixed, loaded).tile == 0
    # the fixture has no fused-attention (--ort-graphs) UNet: its attention scores alone exceed 8 GiB at 2048 px
    with pytest.raises(MemoryBudgetError, match="control_unet needs about .* cannot be tiled.*--ort-graphs"):
        plan_vae(manifest, "vae_decoder", "vae_decoder", (2048, 2048), 8 << 30, 0, fixed + ["control_unet"], loaded)
    with pytest.raises(MemoryBudgetError, match="even with 128 px VAE tiles"):
        plan_vae(manifest, "vae_decoder", "vae_decoder", (1024, 1024), 1550 << 20, 0, [], loaded)
    with pytest.raises(MemoryBudgetError, match="with 1024 px tiles needs about"):
        plan_vae(manifest, "vae_decoder", "vae_decoder", (2048, 2048), 3 << 30, 1024, fixed, loaded)
    # a backend that can only run 256 px tiles (a TensorRT engine profile) gets 256 px tiles
    only256 = lambda n, h, w: max(h, w) <= 256  # noqa: E731
    assert plan_vae(manifest, "vae_decoder", "vae_decoder", (512, 768), big, 0, fixed, loaded, only256).tile == 256
    with pytest.raises(MemoryBudgetError, match="tiling is off"):
        plan_vae(manifest, "vae_decoder", "vae_decoder", (512, 768), big, -1, fixed, loaded, only256)


def test_plan_vae_counts_the_scratch_the_denoising_step_keeps(manifest) -> None:  # type: ignore[no-untyped-def]
    """The ORT arena of the UNet step still holds its whole-image scratch when the VAE runs
    (it was never counted before, and a 2048 px decode was OOM-killed): the planner adds it."""
    loaded = ["control_unet", "vae_decoder", "content_decoder", "hyper_decoder"]
    hw, px = (1024, 1024), 1024.0 * 1024
    tile_px = 256.0 * 256
    plain = estimate_stage_bytes(manifest, "vae_decoder", tile_px, loaded)
    kept = estimate_stage_bytes(manifest, "vae_decoder", tile_px, loaded, ["control_unet"], px)
    unet_scratch = manifest.networks["control_unet"].activation_bytes(px)
    assert kept == pytest.approx(plain + RUNTIME_OVERHEAD * unet_scratch)
    # a network's own scratch is not counted twice
    assert estimate_stage_bytes(manifest, "control_unet", px, loaded, ["control_unet"]) == \
        estimate_stage_bytes(manifest, "control_unet", px, loaded)
    # a budget that 256 px tiles fit only without the retained scratch, 128 px tiles with it
    small = estimate_stage_bytes(manifest, "vae_decoder", 128.0 * 128, loaded, ["control_unet"], px)
    budget = int(small + 36.0 * px) + 1
    assert plain + 36.0 * px < budget < kept + 36.0 * px
    assert plan_vae(manifest, "vae_decoder", "vae_decoder", hw, budget, 256, [], loaded).tile == 256
    with pytest.raises(MemoryBudgetError, match="with 256 px tiles needs about"):
        plan_vae(manifest, "vae_decoder", "vae_decoder", hw, budget, 256, [], loaded, None, ["control_unet"])
    auto = plan_vae(manifest, "vae_decoder", "vae_decoder", hw, budget, 0, [], loaded, None, ["control_unet"])
    assert auto.tile == 128 and auto.estimate_bytes <= budget
    with pytest.raises(MemoryBudgetError, match="even with 128 px VAE tiles"):
        plan_vae(manifest, "vae_decoder", "vae_decoder", hw, budget - 2, 0, [], loaded, None, ["control_unet"])
    assert plan_vae(manifest, "vae_decoder", "vae_decoder", (4096, 4096), 1 << 40, 0, [], loaded).tile == 0
    assert plan_vae(manifest, "vae_decoder", "vae_decoder", (4096, 4096), 4 << 30, 0, [], loaded).tile <= MAX_AUTO_TILE


_ARENA_CHILD = """
import sys, numpy as np, psutil
from pathlib import Path
from runtime.config import defaults
from runtime.manifest import load_manifest
from runtime.backends.onnxruntime import OrtBackend
art = Path(sys.argv[1]); b = OrtBackend(load_manifest(art)[0], art, defaults())
if sys.argv[2] == "keep":
    b._run_options = lambda n: None  # what it did before
b.session("vae_decoder")
r0 = psutil.Process().memory_info().rss
z = np.random.default_rng(0).standard_normal((1, 4, 128, 128)).astype(np.float32)
assert b.run("vae_decoder", {"latent": z})["decoded"].shape == (1, 3, 1024, 1024)
assert b.retains_scratch("control_unet") and not b.retains_scratch("vae_decoder")
print(psutil.Process().memory_info().rss - r0)
"""


def test_one_shot_networks_give_their_arena_back(fixture_artifacts: Path) -> None:
    """ORT keeps a session's peak scratch in its CPU arena; the VAE (once per image) shrinks it
    after each run, the denoising step (reused every step) keeps it and says so. Each case in
    a fresh process, so RSS is not muddied by what the test process freed before."""
    from runtime.backends.onnxruntime import OrtBackend

    deltas = {}
    for mode in ("shrink", "keep"):
        r = subprocess.run([sys.executable, "-c", _ARENA_CHILD, str(fixture_artifacts), mode], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        deltas[mode] = int(r.stdout.strip().splitlines()[-1])
    assert deltas["keep"] > 300 << 20 and deltas["shrink"] < deltas["keep"] / 4, deltas
    m, _ = load_manifest(fixture_artifacts)
    off = OrtBackend(m, fixture_artifacts, defaults(), arena=False)  # no arena: nothing to shrink or keep
    assert not off.retains_scratch("control_unet") and off._run_options("vae_decoder") is None
    z = np.zeros((1, 4, 8, 8), np.float32)
    assert off.run("vae_decoder", {"latent": z})["decoded"].shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------- the real (tiny) VAE


def _big_image(fixture_dir: Path) -> np.ndarray:
    img = np.asarray(Image.open(fixture_dir / "input.png").convert("RGB"))
    img = np.concatenate([img, img[::-1]], axis=0)
    return np.ascontiguousarray(np.concatenate([img, img[:, ::-1]], axis=1))  # 256 x 384


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(4.0 / float(np.mean((a.astype(np.float64) - b) ** 2)))  # signal range [-1, 1]


def _seam_ratio(tiled: np.ndarray, whole: np.ndarray, axis: int) -> float:
    d_t = np.abs(np.diff(tiled, axis=axis)).mean(axis=tuple(i for i in range(4) if i != axis))
    d_w = np.abs(np.diff(whole, axis=axis)).mean(axis=tuple(i for i in range(4) if i != axis))
    return float((d_t / d_w).max())


def test_tiled_decode_and_encode_agree_with_untiled(fixture_artifacts: Path, fixture_dir: Path) -> None:
    codec = Codec(fixture_artifacts, defaults())
    try:
        image = _big_image(fixture_dir)
        x = (image.astype(np.float64) / 255).astype(np.float32).transpose(2, 0, 1)[None]
        run_enc = lambda t: codec.backend.run("vae_encoder", {"image": t})["z_g"]  # noqa: E731
        z_g = run_enc(np.ascontiguousarray(x))
        z_t = encode_tiled(run_enc, np.ascontiguousarray(x), 256, 4)
        assert np.abs(z_t - z_g).max() / np.abs(z_g).max() < ENCODE_REL
        whole, tile0 = codec.vae_decode(z_g)
        assert tile0 == 0
        tiled, tile = codec.vae_decode(z_g, codec.cfg.with_(tile=256))
        assert tile == 256 and tile_grid(32, 48, 32).count == 2
        assert _psnr(tiled, whole) > DECODE_PSNR_DB
        assert _seam_ratio(tiled, whole, 3) < SEAM_RATIO and _seam_ratio(tiled, whole, 2) < SEAM_RATIO
        one, t1 = codec.vae_decode(z_g, codec.cfg.with_(tile=384))  # one tile covers the image
        assert t1 == 0
        np.testing.assert_array_equal(one, whole)
    finally:
        codec.close()


def test_codec_tiles_encode_and_decode_end_to_end(fixture_artifacts: Path, fixture_dir: Path) -> None:
    image = _big_image(fixture_dir)
    whole = Codec(fixture_artifacts, defaults())
    tiled = Codec(fixture_artifacts, defaults().with_(tile=128))
    try:
        a = whole.encode(image, container="native", sampler="ddim", steps=4)
        b = tiled.encode(image, container="native", sampler="ddim", steps=4)
        assert a.vae_tile == 0 and b.vae_tile == 128
        da, db = whole.decode(a.data), tiled.decode(b.data)
        assert db.vae_tile == 128 and db.image.shape == image.shape == da.image.shape
        # the tiled stream is a valid stream for any decoder
        assert whole.decode(b.data).image.shape == image.shape
    finally:
        whole.close()
        tiled.close()


def test_budget_errors_from_the_cli(fixture_artifacts: Path, fixture_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.fromarray(np.tile(_big_image(fixture_dir), (8, 8, 1))).save(big)  # 2048 x 3072
    out = tmp_path / "o.deic"
    r = subprocess.run([sys.executable, "-m", "runtime.encode", str(big), "-o", str(out), "--engines",
                        str(fixture_artifacts), "--max-memory", "300M"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and "does not fit the memory budget of 0.3 GiB" in r.stderr, r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "runtime.decode", str(fixture_dir / "stream.bin"), "-o",
                        str(tmp_path / "x.png"), "--engine", str(fixture_artifacts), "--tile", "100"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "multiple of 64" in r.stderr
