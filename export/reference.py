"""The PyTorch reference pipeline of DiffEIC: the ground truth later runtimes are compared to.

This module owns :class:`ReferencePipeline`, which loads the official checkpoints
(``sd.ckpt`` + ``lc.ckpt``) and an official-layout config into the torch ports of
:mod:`export.models` and runs the official ``inference_partition.py`` flow stage by
stage, exposing every intermediate:

* ``preprocess``: uint8 image -> zero-padded (bottom/right, multiples of 64) NCHW
  control in [0, 1], computed as ``torch.tensor(img / 255.0, dtype=float32)`` (float64
  division, then one rounding to float32), exactly as the official ``process()``;
* ``vae_encode`` / ``compress`` / ``decompress``: VAE moments and ``z_g``, the LFGCM symbol
  path (:meth:`LFGCM.compress_symbols`) and the official ``write_body`` bitstream coded
  with the C++ rANS coder (:mod:`runtime.entropy_coding`, compressai-compatible format);
* ``eps`` / ``sample`` / ``vae_decode`` / ``to_image``: control + UNet, the numpy samplers
  of :mod:`runtime.sampler` driven by the torch model, the VAE decoder and the official
  uint8 post-processing with the crop back to the input size;
* ``encode_image`` / ``decode_stream``: the two ends glued together.

Entropy tables are rebuilt from the checkpoint as ``update(force=True)`` does
(:func:`export.tables.build_tables`), because training checkpoints hold empty CDF buffers.
Everything runs in float32 on the CPU, batch 1, with no randomness of its own: noise is
always injected (``x_T`` and, for DDPM, the per-step noise).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from export.checkpoints import load_state_dict_file, require_parts
from export.config import DiffEICConfig, load_config
from export.models.lfgcm import LFGCM, load_lfgcm
from export.models.sd import load_controlled_unet, load_vae
from export.models.unet import ControlledUNet
from export.models.vae import AutoencoderKL
from export.tables import build_tables
from runtime import bitstream
from runtime.entropy_coding import (
    BottleneckTables,
    GaussianTables,
    IndexDecoder,
    decode_z,
    encode_with_indexes,
    encode_z,
)
from runtime.sampler import NoiseSource, ReplayNoise, Sampler, Schedule, make_sampler, run, to_uint8_image

log = logging.getLogger(__name__)

__all__ = ["ReferencePipeline", "PAD_MULTIPLE", "pad_image"]

# The official code pads to multiples of 64: the LFGCM hyper-latent sits at 1/64.
PAD_MULTIPLE = 64
# File names of the official/fixture folder layout.
FIXTURE_FILES = {"config": "config.yaml", "sd": "sd.ckpt", "lc": "lc.ckpt", "context": "null_context.npy"}


def pad_image(image_u8: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """``utils.image.pad``: zero-pad an HxWx3 image at the bottom and right to multiples."""
    h, w = image_u8.shape[:2]
    ph = (-h) % multiple
    pw = (-w) % multiple
    return np.pad(image_u8, ((0, ph), (0, pw), (0, 0)), mode="constant", constant_values=0)


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _f32(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(torch.float32)


class ReferencePipeline:
    """DiffEIC reference inference in torch (CPU, float32, batch 1).

    Build it with :meth:`from_files` (checkpoint paths + config path or preset name +
    empty-prompt context) or :meth:`from_fixture` (a folder of the golden-fixture layout).
    """

    def __init__(self, cfg: DiffEICConfig, sd_state: Mapping[str, torch.Tensor],
                 lc_state: Mapping[str, torch.Tensor], null_context: np.ndarray | torch.Tensor) -> None:
        # Check whole parts first: a swapped or foreign checkpoint then fails with one
        # message naming the file role, instead of a long missing-keys list.
        require_parts(sd_state, ["unet", "vae"], "SD checkpoint")
        require_parts(lc_state, ["control", "lfgcm"], "DiffEIC lc checkpoint")
        self.cfg = cfg
        self.vae: AutoencoderKL = load_vae(sd_state, cfg)
        self.model: ControlledUNet = load_controlled_unet(sd_state, lc_state, cfg)
        self.lfgcm: LFGCM = load_lfgcm(lc_state, cfg, where="DiffEIC lc checkpoint (preprocess_model.*)")
        ctx = _f32(null_context)
        width = int(cfg.unet["context_dim"])
        if ctx.ndim != 3 or ctx.shape[0] != 1 or ctx.shape[2] != width:
            raise ValueError(
                f"null context must have shape (1, tokens, {width}) (context_dim of the config), "
                f"got {tuple(ctx.shape)}"
            )
        self.context = ctx
        # update(force=True): the CDF tables rebuilt from the loaded parameters.
        self.tables: dict[str, np.ndarray] = build_tables(self.lfgcm.entropy_bottleneck)
        self.gaussian = GaussianTables.from_npz(self.tables)
        self.bottleneck = BottleneckTables.from_npz(self.tables)
        self._medians = torch.from_numpy(self.tables["eb_medians"])
        self._scale_table = torch.from_numpy(self.tables["gc_scale_table"])
        self.schedule = Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_files(cls, sd_ckpt: str | Path, lc_ckpt: str | Path, config: str | Path,
                   null_context: np.ndarray | torch.Tensor | str | Path) -> "ReferencePipeline":
        """Load checkpoints, a config (YAML path or preset name) and the empty-prompt context
        (an array or a ``.npy`` path). Raises ConfigError / CheckpointError with a reason."""
        cfg = load_config(config)
        sd_state = load_state_dict_file(sd_ckpt)
        lc_state = load_state_dict_file(lc_ckpt)
        if isinstance(null_context, (str, Path)):
            try:
                null_context = np.load(Path(null_context))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{null_context}: cannot read the null context ({exc})") from exc
        return cls(cfg, sd_state, lc_state, null_context)

    @classmethod
    def from_fixture(cls, folder: str | Path) -> "ReferencePipeline":
        """Load ``config.yaml``, ``sd.ckpt``, ``lc.ckpt`` and ``null_context.npy`` of a folder."""
        folder = Path(folder)
        f = {k: folder / v for k, v in FIXTURE_FILES.items()}
        return cls.from_files(f["sd"], f["lc"], f["config"], f["context"])

    # ------------------------------------------------------------------ encoder side

    @staticmethod
    def preprocess(image_u8: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """HxWx3 uint8 -> ((1, 3, Hp, Wp) float32 control in [0, 1], (H, W)).

        Pads the uint8 image first (zeros at bottom/right), then divides by 255 in float64
        and rounds once to float32, as ``torch.tensor(img / 255.0, dtype=float32)``.
        """
        img = np.asarray(image_u8)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got shape {img.shape} dtype {img.dtype}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"empty image of shape {img.shape}")
        padded = pad_image(img)
        control = torch.tensor(padded[None] / 255.0, dtype=torch.float32).clamp_(0, 1)
        control = control.permute(0, 3, 1, 2).contiguous()
        return control, (int(img.shape[0]), int(img.shape[1]))

    @torch.no_grad()
    def vae_encode(self, control: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """VAE on ``control * 2 - 1``: ``moments`` (mean | logvar) and ``z_g = mean * scale``."""
        x = _f32(control) * 2 - 1
        moments = self.vae.encode_moments(x)
        # Same float32 product as encode_mode_scaled (mean * float32(scale_factor)),
        # without running the encoder twice.
        z_g = moments[:, : self.vae.embed_dim] * self.vae.scale_factor
        return {"moments": moments, "z_g": z_g}

    @torch.no_grad()
    def compress(self, control: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """The official ``apply_condition_compress`` + ``write_body`` for one control image.

        Returns the VAE outputs (``moments``, ``z_g``), everything of
        :meth:`LFGCM.compress_symbols`, and ``y_string``, ``z_string`` and ``stream``
        (the ``write_body`` bytes).
        """
        control = _f32(control)
        if control.ndim != 4 or control.shape[0] != 1 or control.shape[1] != 3:
            raise ValueError(f"control must be (1, 3, H, W), got {tuple(control.shape)}")
        if control.shape[2] % PAD_MULTIPLE or control.shape[3] % PAD_MULTIPLE:
            raise ValueError(f"control size {tuple(control.shape[2:])} is not padded to multiples of {PAD_MULTIPLE}")
        out: dict[str, Any] = dict(self.vae_encode(control))
        out.update(self.lfgcm.compress_symbols(control, out["z_g"], self._medians, self._scale_table))
        y_string = encode_with_indexes(_np(out["y_symbols"]), _np(out["y_indexes"]), self.gaussian, "compat")
        z_string, _ = encode_z(_np(out["z"][0]), self.bottleneck, "compat")
        z_hw = (int(out["z"].shape[2]), int(out["z"].shape[3]))
        out.update(y_string=y_string, z_string=z_string,
                   stream=bitstream.pack_reference(y_string, z_string, z_hw))
        return out

    def encode_image(self, image_u8: np.ndarray) -> bytes:
        """HxWx3 uint8 -> the official bitstream file bytes."""
        control, _ = self.preprocess(image_u8)
        return self.compress(control)["stream"]

    # ------------------------------------------------------------------ decoder side

    @torch.no_grad()
    def decompress(self, stream_bytes: bytes) -> dict[str, torch.Tensor]:
        """Official ``apply_condition_decompress``: stream -> ``z_hat``, ``hyper_params``,
        ``y_hat``, ``f_c``, ``c_latent`` (plus ``y_symbols``/``y_indexes`` and per-slice params).

        Accepts the official ``write_body`` layout or a native DEIC container.
        """
        s = bitstream.unpack(bytes(stream_bytes))
        z_hat = torch.from_numpy(decode_z(s.z, self.bottleneck, s.z_hw, s.coder_format))[None]
        # decompress_loop hands over the CDF indexes of each half-slice in stream order,
        # exactly what the official RansDecoder.decode_stream receives.
        decoder = IndexDecoder(s.y, self.gaussian, s.coder_format)

        def read_symbols(indexes: torch.Tensor) -> torch.Tensor:
            idx = np.ascontiguousarray(indexes.reshape(-1).numpy(), np.int32)
            return torch.from_numpy(np.asarray(decoder.decode(idx), np.int32))

        out = self.lfgcm.decompress_loop(z_hat, read_symbols, self._scale_table)
        decoder.finish()
        return out

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor | np.ndarray, t: int | float | torch.Tensor,
            c_latent: torch.Tensor | np.ndarray) -> np.ndarray:
        """One ``DiffEIC.apply_model`` call (control + UNet, empty-prompt context) -> eps (float32).

        ``t`` is an integer timestep (DDPM/DDIM, a long tensor as in the official samplers)
        or a fractional one (DPM-Solver++'s model time, a float32 tensor)."""
        x = _f32(x_t)
        tt = torch.as_tensor(t)
        tt = tt.to(torch.float32 if tt.is_floating_point() else torch.long).reshape(-1)
        if tt.numel() == 1 and x.shape[0] > 1:
            tt = tt.expand(x.shape[0])
        ctx = self.context.expand(x.shape[0], -1, -1)
        return _np(self.model(x, tt, _f32(c_latent), ctx)).astype(np.float32, copy=False)

    def make_sampler(self, sampler: str, steps: int) -> Sampler:
        """The official sampler (``"ddpm"`` spaced fixed_small, ``"ddim"`` eta 0 or ``"dpmpp"``
        DPM-Solver++ 2M) on the config's schedule. For DDIM, ``steps`` is the official S."""
        return make_sampler(sampler, steps, self.schedule)

    def sample(self, c_latent: torch.Tensor | np.ndarray, sampler: str = "ddpm", steps: int = 50,
               x_T: np.ndarray | None = None, noise: np.ndarray | NoiseSource | None = None
               ) -> dict[str, Any]:
        """Run the sampler with the torch model as ``model_fn``.

        ``x_T`` is required (the reference draws no random numbers); ``noise`` is the
        ``(steps, *x_T.shape)`` per-step noise for DDPM (or any NoiseSource). Returns
        ``x_steps`` (n+1 latents: the one entering each step, then the sample),
        ``eps_steps``, ``pred_x0_steps``, ``timesteps``, ``samples`` (all float32 numpy).
        """
        if x_T is None:
            raise ValueError("x_T is required: the reference pipeline injects all noise")
        smp = self.make_sampler(sampler, steps)
        x_T = np.asarray(x_T, dtype=np.float32)
        source: NoiseSource | None
        if noise is None or isinstance(noise, np.ndarray):
            source = ReplayNoise(x_T, noise)
        else:
            source = noise
        c = _f32(c_latent)
        xs: list[np.ndarray] = [x_T]
        epss: list[np.ndarray] = []

        def model_fn(x: np.ndarray, t: int | float) -> np.ndarray:
            e = self.eps(x, t, c)
            epss.append(e)
            return e

        def record(i: int, t: int | float, x_next: np.ndarray, e: np.ndarray) -> None:
            xs.append(np.array(x_next, dtype=np.float32))

        samples = run(smp, x_T, model_fn, source if smp.needs_noise() else None, record)
        pred_x0 = [smp.predict_x0(i, xs[i], epss[i]) for i in range(len(epss))]  # type: ignore[attr-defined]
        return {
            "timesteps": smp.timesteps.copy(),
            "x_steps": np.stack(xs),
            "eps_steps": np.stack(epss),
            "pred_x0_steps": np.stack(pred_x0),
            "samples": samples,
        }

    @torch.no_grad()
    def vae_decode(self, latent: torch.Tensor | np.ndarray) -> np.ndarray:
        """``decode_first_stage``: ``decoder(post_quant_conv(z * (1/scale)))``, not clamped."""
        return _np(self.vae.decode_scaled(_f32(latent))).astype(np.float32, copy=False)

    @staticmethod
    def to_image(decoded: np.ndarray | torch.Tensor, original_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Official post-processing (truncating uint8 cast), cropped to ``original_hw``."""
        img = to_uint8_image(_np(decoded))
        if original_hw is not None:
            h, w = original_hw
            if h > img.shape[0] or w > img.shape[1]:
                raise ValueError(f"crop {original_hw} is larger than the decoded image {img.shape[:2]}")
            img = img[:h, :w]
        return np.ascontiguousarray(img)

    def decode_stream(self, stream_bytes: bytes, sampler: str = "ddpm", steps: int = 50,
                      x_T: np.ndarray | None = None, noise: np.ndarray | NoiseSource | None = None,
                      original_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Stream -> uint8 image. The official layout carries no image size: without
        ``original_hw`` (or a native container's size) the padded image is returned."""
        dec = self.decompress(stream_bytes)
        if original_hw is None:
            original_hw = bitstream.unpack(bytes(stream_bytes)).original_hw
        latent_shape = tuple(dec["c_latent"].shape)
        if x_T is not None and tuple(np.shape(x_T)) != latent_shape:
            raise ValueError(f"x_T has shape {np.shape(x_T)}, the stream's latent is {latent_shape}")
        out = self.sample(dec["c_latent"], sampler, steps, x_T, noise)
        return self.to_image(self.vae_decode(out["samples"]), original_hw)

