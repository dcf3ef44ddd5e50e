"""Encode and decode images with DiffEIC from an artifact directory alone.

``Codec`` ties the pieces together: the manifest and tables, a backend that evaluates
the exported networks, the latent-coding loop with the C++ rANS coder, the sampler and
the containers. Encoding: pad to multiples of 64 -> image encoder (SD VAE encoder +
LFGCM analysis) -> z coded with the EntropyBottleneck tables -> hyper decoder -> y coded
slice by slice. Decoding mirrors the entropy part, then runs the content decoder, the
denoising loop (control + UNet) and the VAE decoder, and crops back. The VAE runs in
tiles when the image would not fit the memory budget (runtime.tiling).
"""

from __future__ import annotations

import logging
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import bitstream
from .backends import Backend, make_backend
from .bitstream import BitstreamError, Stream
from .config import RuntimeConfig, default_steps, defaults
from .entropy_coding import BottleneckTables, GaussianTables, YDecoder, YEncoder, decode_z, encode_z
from .latent_coding import code_slices
from .manifest import Manifest, ManifestError, load_manifest, verify_file
from .portable import PortableContextModel, PortableParams
from .sampler import GaussianNoise, NoiseSource, Schedule, make_sampler, run, to_uint8_image
from .tiling import VaePlan, decode_tiled, default_budget_bytes, encode_tiled, plan_vae

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (step index, number of steps)


@dataclass
class Timings:
    """Wall time per stage, seconds, in the order the stages ran."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class EncodeResult:
    data: bytes
    stream: Stream
    bpp: float  # container bits per pixel of the original image
    timings: Timings
    vae_tile: int = 0  # VAE encoder tile side in pixels; 0: the whole image at once


@dataclass
class DecodeResult:
    image: np.ndarray  # (H, W, 3) uint8, cropped to the original size
    c_latent: np.ndarray
    samples: np.ndarray
    decoded: np.ndarray  # VAE output before post-processing, padded size
    stream: Stream
    timings: Timings
    vae_tile: int = 0  # VAE decoder tile side in pixels; 0: the whole image at once


def pad_image(image: np.ndarray, multiple: int = 64) -> np.ndarray:
    """Zero-pad an (H, W, 3) uint8 image at the bottom and right (official ``utils.image.pad``)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"image is empty ({h}x{w})")
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if max(ph, pw) > bitstream.MAX_SIDE:
        raise ValueError(f"image {h}x{w} is larger than the supported {bitstream.MAX_SIDE} pixels per side")
    if (ph, pw) == (h, w):
        return image
    out = np.zeros((ph, pw, 3), np.uint8)
    out[:h, :w] = image
    return out


def image_to_input(image: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 (1, 3, H, W) in [0, 1]; the division happens in float64 like the official code."""
    x = (image.astype(np.float64) / 255.0).astype(np.float32)
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0).transpose(2, 0, 1)[None])


class Codec:
    """DiffEIC encoder + decoder over one artifact directory and one backend."""

    def __init__(self, artifacts: str | Path, cfg: RuntimeConfig | None = None, backend: Backend | None = None) -> None:
        self.cfg = cfg or defaults()
        self.manifest, self.directory = load_manifest(artifacts)
        m: Manifest = self.manifest
        path = (verify_file(self.directory, m.tables_file, m.tables_sha256, "tables") if self.cfg.verify_hashes
                else self.directory / m.tables_file)
        with np.load(path) as t:
            self.gaussian = GaussianTables.from_npz(t)
            self.bottleneck = BottleneckTables.from_npz(t)
        try:
            self.slice_ch = [int(c) for c in m.model["slice_ch"]]
            sched = m.model["schedule"]
            self.schedule = Schedule(float(sched["linear_start"]), float(sched["linear_end"]), int(sched["timesteps"]))
            self.latent_channels = int(m.model["latent_channels"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest 'model' section is incomplete: {exc}") from exc
        self.fingerprint16 = bytes.fromhex(m.fingerprint)[: bitstream.FINGERPRINT_BYTES]
        self.portable = self._load_portable()
        self.backend = backend or make_backend(self.cfg.backend, m, self.directory, self.cfg)

    def _load_portable(self) -> PortableContextModel | None:
        """The integer context model, when the artifacts carry ``portable.npz`` (model.portable)."""
        info = self.manifest.model.get("portable")
        if info is None:
            return None
        try:
            file, sha = str(info["file"]), str(info["sha256"])
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest 'model.portable' is malformed: {exc}") from exc
        path = (verify_file(self.directory, file, sha, "portable params") if self.cfg.verify_hashes
                else self.directory / file)
        params = PortableParams.load(path)
        params.check_model(int(self.manifest.model["N"]), int(self.manifest.model["M"]), self.slice_ch)
        return PortableContextModel(params)

    def _require_portable(self) -> PortableContextModel:
        if self.portable is None:
            raise ValueError("these artifacts have no portable entropy parameters (portable.npz); "
                             "re-export them or use the reference entropy path")
        return self.portable

    # ---------------------------------------------------------------- encode
    def encode(self, image: np.ndarray, **overrides: object) -> EncodeResult:
        """Compress an (H, W, 3) uint8 RGB image. ``overrides`` change RuntimeConfig fields
        for this call (container, coder_format, sampler, steps, seed)."""
        cfg = self.cfg.with_(**overrides)
        make_sampler(cfg.sampler, cfg.steps, self.schedule)  # a stream no decoder could sample is refused here
        if cfg.container == "reference" and cfg.coder_format != "compat":
            raise ValueError("the reference container holds compat-format rANS streams only; use the native container")
        if cfg.container == "reference" and cfg.entropy_path != "reference":
            raise ValueError("the reference container cannot signal the portable entropy path; use the native container")
        timings = Timings()
        h, w = image.shape[:2]
        padded = pad_image(image)
        x = image_to_input(padded)
        plan = self.vae_plan("encode", padded.shape[:2], cfg)
        with timings.stage("image_encoder"):
            if plan.tile:
                z_g = encode_tiled(lambda t: self.backend.run("vae_encoder", {"image": t})["z_g"], x, plan.tile,
                                   self.latent_channels)
                out = self.backend.run("lfgcm_analysis", {"image": x, "z_g": z_g})
            else:
                out = self.backend.run("image_encoder", {"image": x})
        y, z = out["y"], out["z"]
        with timings.stage("latent_coding"):
            z_string, z_hat = encode_z(z[0], self.bottleneck, cfg.coder_format)
            if cfg.entropy_path == "portable":
                # integer hyper decoder + context model: no float network is involved
                y_string = self._require_portable().encode(y[0], z_hat, self.gaussian, cfg.coder_format).y_string
            else:
                hyper_params = self._hyper(z_hat)[0]
                enc = YEncoder(self.gaussian, cfg.coder_format)

                def code_half(scales: np.ndarray, means: np.ndarray, half: str, c0: int, c1: int) -> np.ndarray:
                    return enc.encode_half(y[0, c0:c1], scales, means, half)

                code_slices(self.backend.run, hyper_params, self.slice_ch, code_half)
                y_string = enc.finish()
        stream = Stream(
            y=y_string, z=z_string, padded_hw=padded.shape[:2], original_hw=(h, w),
            coder_format=cfg.coder_format, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed,
            fingerprint=self.fingerprint16, container=cfg.container, entropy_path=cfg.entropy_path,
        )
        data = bitstream.pack(stream)
        return EncodeResult(data=data, stream=stream, bpp=len(data) * 8.0 / (h * w), timings=timings,
                            vae_tile=plan.tile)

    def _hyper(self, z_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.backend.run("hyper_decoder", {"z_hat": np.ascontiguousarray(z_hat[None], np.float32)})
        return out["hyper_params"], out["f_c"]

    # ---------------------------------------------------------------- decode
    def parse(self, data: bytes) -> Stream:
        """Unpack a stream and check that it belongs to these artifacts."""
        stream = bitstream.unpack(data)
        if stream.fingerprint is not None and stream.fingerprint != self.fingerprint16:
            raise BitstreamError(
                f"stream was encoded with another model (fingerprint {stream.fingerprint.hex()}, "
                f"these artifacts are {self.fingerprint16.hex()})"
            )
        if stream.entropy_path == "portable" and self.portable is None:
            raise BitstreamError(f"entropy path {stream.entropy_path!r} is not supported by these artifacts")
        return stream

    def decode_latent(self, stream: Stream, timings: Timings | None = None) -> np.ndarray:
        """Entropy-decode a stream and run the content decoder; returns c_latent (1, C, h/8, w/8)."""
        timings = timings or Timings()
        with timings.stage("latent_decoding"):
            z_hat = decode_z(stream.z, self.bottleneck, stream.z_hw, stream.coder_format)
            hyper_params, f_c = self._hyper(z_hat)  # f_c (float) feeds only the content decoder
            if stream.entropy_path == "portable":
                y_hat = self._require_portable().decode(stream.y, z_hat, self.gaussian, stream.coder_format)[0]
            else:
                dec = YDecoder(stream.y, self.gaussian, stream.coder_format)

                def code_half(scales: np.ndarray, means: np.ndarray, half: str, c0: int, c1: int) -> np.ndarray:
                    return dec.decode_half(scales, means, half)

                y_hat = code_slices(self.backend.run, hyper_params, self.slice_ch, code_half)
                dec.finish()
        with timings.stage("content_decoder"):
            return self.backend.run("content_decoder", {"y_hat": y_hat, "f_c": f_c})["c_latent"]

    def sample(self, c_latent: np.ndarray, sampler_name: str, steps: int, noise: NoiseSource,
               timings: Timings | None = None, on_step: StepCallback | None = None) -> np.ndarray:
        """The denoising loop (control + UNet per step, then the sampler update)."""
        timings = timings or Timings()
        sampler = make_sampler(sampler_name, steps, self.schedule)
        shape = (1, self.latent_channels) + c_latent.shape[2:]
        noise.check(sampler, shape)
        x_T = noise.initial(shape)
        n = len(sampler.timesteps)

        def model_fn(x: np.ndarray, t: int) -> np.ndarray:
            return self.backend.run("control_unet", {
                "x_t": x, "t": np.array([t], np.float32), "c_latent": c_latent,
            })["eps"]

        def callback(i: int, t: int, x_next: np.ndarray, eps: np.ndarray) -> None:
            if on_step is not None:
                on_step(i, n)

        with timings.stage("denoise"):
            denoise = getattr(self.backend, "denoise", None)
            if denoise is not None:  # backends with a fused step (CUDA graph) take the whole loop
                return denoise(sampler, x_T, c_latent, noise, callback)
            return run(sampler, x_T, model_fn, noise, callback)

    def sampling_for(self, stream: Stream, sampler: str | None = None,
                     steps: int | None = None) -> tuple[str, int, int]:
        """(sampler, steps, seed) a stream decodes with: the caller's, else the stream's, else
        the config's. The stream's step count belongs to the stream's sampler: another sampler
        asked for without steps gets its own default (DPM-Solver++ would refuse DDPM's 50).
        Raises ValueError for a sampler/steps pair no sampler accepts."""
        name = sampler or stream.sampler or self.cfg.sampler
        stream_steps = stream.steps if name == (stream.sampler or self.cfg.sampler) else None
        n = steps or stream_steps or (self.cfg.steps if name == self.cfg.sampler else default_steps(name))
        make_sampler(name, n, self.schedule)
        return name, n, stream.seed if stream.seed is not None else self.cfg.seed

    def decode(self, data: bytes, *, sampler: str | None = None, steps: int | None = None,
               noise: NoiseSource | None = None, crop_hw: tuple[int, int] | None = None,
               on_step: StepCallback | None = None) -> DecodeResult:
        """Decompress a stream to an image. Sampler, steps and seed come from the stream
        (native container) unless given; the reference container uses the config's."""
        timings = Timings()
        with timings.stage("parse"):
            stream = self.parse(data)
        c_latent = self.decode_latent(stream, timings)
        sampler_name, n_steps, seed = self.sampling_for(stream, sampler, steps)
        samples = self.sample(c_latent, sampler_name, n_steps, noise or GaussianNoise(seed), timings, on_step)
        with timings.stage("vae_decoder"):
            decoded, tile = self.vae_decode(samples)
        image = to_uint8_image(decoded)
        oh, ow = crop_hw or stream.original_hw or image.shape[:2]
        return DecodeResult(image=np.ascontiguousarray(image[:oh, :ow]), c_latent=c_latent, samples=samples,
                            decoded=decoded, stream=stream, timings=timings, vae_tile=tile)

    def vae_decode(self, samples: np.ndarray, cfg: RuntimeConfig | None = None) -> tuple[np.ndarray, int]:
        """The VAE decoder on the final latent, tiled when the plan says so; (decoded, tile)."""
        cfg = cfg or self.cfg
        plan = self.vae_plan("decode", (8 * samples.shape[2], 8 * samples.shape[3]), cfg)
        run = lambda z: self.backend.run("vae_decoder", {"latent": z})["decoded"]  # noqa: E731
        if plan.tile:
            return decode_tiled(run, samples, plan.tile), plan.tile
        return run(samples), 0

    def vae_plan(self, direction: str, padded_hw: tuple[int, int], cfg: RuntimeConfig | None = None) -> VaePlan:
        """Whether the VAE of ``direction`` ("encode"/"decode") runs whole or in tiles, within
        the memory budget (see runtime.tiling). Raises MemoryBudgetError / ManifestError."""
        cfg = cfg or self.cfg
        graph = getattr(self.backend, "graph_for", lambda n: n)
        ctx = [n for n in self.manifest.networks if n.startswith("ctx_") and "." not in n]
        budget = cfg.max_memory_mb << 20 if cfg.max_memory_mb else default_budget_bytes()
        if direction == "decode":
            whole = tile_net = "vae_decoder"
            fixed = [graph("content_decoder"), graph("control_unet")]
            loaded = [graph(n) for n in ("hyper_decoder", "content_decoder", "control_unet", "vae_decoder")]
        else:
            whole, tile_net = "image_encoder", "vae_encoder"
            fixed = [graph("lfgcm_analysis")] if "lfgcm_analysis" in self.manifest.networks else []
            loaded = [graph(n) for n in ("vae_encoder", "lfgcm_analysis", "hyper_decoder")
                      if n in self.manifest.networks]
        loaded += [graph(n) for n in ctx]
        admits = getattr(self.backend, "admits", None)
        keeps = getattr(self.backend, "retains_scratch", lambda n: False)
        fixed = [n for n in fixed if n in self.manifest.networks]
        plan = plan_vae(self.manifest, graph(whole), graph(tile_net), padded_hw, budget, cfg.tile, fixed, loaded,
                        admits, [n for n in fixed if keeps(n)])
        if plan.tile and direction == "encode" and not {"vae_encoder", "lfgcm_analysis"} <= set(self.manifest.networks):
            raise ManifestError("tiled encoding needs the vae_encoder and lfgcm_analysis networks, which these "
                                "artifacts lack; re-export them with this version (python -m export ...)")
        log.debug("VAE %s at %s: %s", direction, padded_hw, plan)
        return plan

    def close(self) -> None:
        self.backend.close()
