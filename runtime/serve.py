"""``python -m runtime.serve --engines ARTIFACT_DIR``: the DiffEIC HTTP service on Ray Serve.

This module owns the serving layer and nothing below it:

* :func:`decode_many`, the batched decoder (no Ray needed): requests whose latents have
  the same resolution and whose sampler and step count agree share ONE denoising loop.
  The exported ``control_unet`` graph has its batch axis fixed to 1, so inside the
  shared loop the graph runs once per item per step; the loop, the step bookkeeping and
  the sampler arithmetic are shared. Every item keeps its own noise generator and the
  same operation order as :meth:`runtime.pipeline.Codec.decode`, so outputs are
  bit-identical to unbatched decoding. True batched kernels need a symbolic batch axis
  in the export (``export/specs.py``: the leading ``1`` of every tensor spec).
* :class:`ServeSettings` and :func:`build_app`: the Ray Serve deployment, one warm
  :class:`~runtime.pipeline.Codec` per replica (``num_gpus`` per replica where GPUs
  exist), behind a FastAPI ingress (OpenAPI schema at ``/openapi.json``):
  ``POST /encode`` (image bytes -> stream bytes), ``POST /decode`` (stream bytes -> PNG),
  ``GET /healthz``. Request hygiene: body and pixel limits, content-type checks, a
  per-request timeout, a bound on queued requests (503 + ``Retry-After``), and JSON
  4xx errors that carry the runtime's own messages.
* Metrics through ``ray.serve.metrics`` (exported by Ray's metrics agent, Prometheus
  format, next to Serve's built-in request metrics).
* :func:`start` / :func:`stop` and the CLI: start a local Ray instance (or join
  ``RAY_ADDRESS``) and deploy.
"""

# No ``from __future__ import annotations`` here: Ray Serve pickles the ingress class by
# value, which keeps only the globals the code references, so FastAPI could not resolve
# string annotations such as "Request" inside the replica.

import argparse
import dataclasses
import asyncio
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import BACKENDS, CODER_FORMATS, CONTAINERS, SAMPLERS, RuntimeConfig, default_steps, defaults
from .manifest import ManifestError, load_manifest
from .pipeline import Codec, Timings
from .sampler import GaussianNoise, make_sampler, to_uint8_image
from .tiling import MemoryBudgetError, parse_memory, parse_tile

try:  # the serving extra; decode_many and the settings work without it
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
except ImportError:  # pragma: no cover - exercised only without the extra
    FastAPI = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

APP_NAME = "diffeic"
DEPLOYMENT_NAME = "DiffEIC"

# What /encode accepts (anything PIL reads is tried, but the declared type must be one of
# these) and what /decode accepts.
IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff",
                       "application/octet-stream")
STREAM_CONTENT_TYPES = ("application/octet-stream", "application/x-diffeic")

# Latency histogram bucket bounds, seconds: CPU decodes of real models take minutes.
LATENCY_BOUNDS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


# ============================================================ batched decoding (no Ray)


@dataclass
class DecodeJob:
    """One decode request: the stream and the overrides of ``Codec.decode``."""

    data: bytes
    sampler: str | None = None
    steps: int | None = None
    crop_hw: tuple[int, int] | None = None
    # time.monotonic() after which nobody waits for the result: the job is dropped at the
    # next step instead of using compute for a request that has already timed out.
    deadline: float | None = None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class DecodeTimeout(TimeoutError):
    """A decode job passed its deadline and was dropped."""


@dataclass
class DecodeOutcome:
    """The image of one job, or the error that stopped it (never both)."""

    image: np.ndarray | None = None
    error: BaseException | None = None
    batch_size: int = 1  # how many jobs shared this job's denoising loop
    timings: Timings = field(default_factory=Timings)


@dataclass
class _Prepared:
    index: int
    job: DecodeJob
    c_latent: np.ndarray
    sampler_name: str
    steps: int
    seed: int
    crop_hw: tuple[int, int] | None
    original_hw: tuple[int, int] | None
    timings: Timings


def _prepare(codec: Codec, index: int, job: DecodeJob) -> _Prepared:
    # The same resolution rules as Codec.decode, so a batched job decodes like an unbatched one.
    timings = Timings()
    with timings.stage("parse"):
        stream = codec.parse(job.data)
    # rejects a bad sampler/steps pair before the costly part
    sampler_name, steps, seed = codec.sampling_for(stream, job.sampler, job.steps)
    c_latent = codec.decode_latent(stream, timings)
    return _Prepared(index, job, c_latent, sampler_name, steps, seed, job.crop_hw, stream.original_hw, timings)


def _shared_loop(codec: Codec, group: list[_Prepared]) -> list[np.ndarray | None]:
    """One denoising loop for a group with equal latent shape, sampler and steps.

    Mirrors ``runtime.sampler.run`` per item: model call, then that item's step noise,
    then the sampler update, in this order for every item, so each item's arithmetic and
    random draws are exactly those of an unbatched decode. Items are independent, so one
    dropped at its deadline (returned as None) changes nothing for the others.
    """
    first = group[0]
    sampler = make_sampler(first.sampler_name, first.steps, codec.schedule)
    shape = (1, codec.latent_channels) + first.c_latent.shape[2:]
    noises = [GaussianNoise(p.seed) for p in group]
    for noise in noises:
        noise.check(sampler, shape)
    xs: list[np.ndarray | None] = [np.asarray(noise.initial(shape), dtype=np.float32) for noise in noises]
    states = [sampler.new_state() for _ in group]  # multistep memory, one per item
    needs = sampler.needs_noise()
    t0 = time.perf_counter()
    for i, t in enumerate(sampler.timesteps.tolist()):
        t_arr = np.array([t], np.float32)
        for k, p in enumerate(group):
            if xs[k] is None:
                continue
            if p.job.expired():
                xs[k] = None
                continue
            # The graph's batch axis is fixed to 1: one call per item, inside the shared step.
            eps = np.asarray(codec.backend.run("control_unet", {"x_t": xs[k], "t": t_arr, "c_latent": p.c_latent})["eps"])
            if eps.shape != xs[k].shape:
                raise ValueError(f"control_unet returned shape {eps.shape} at t={t}, expected {xs[k].shape}")
            step_noise = noises[k].step_noise(i, shape) if needs else None
            xs[k] = sampler.step(i, xs[k], eps, step_noise, states[k])
    elapsed = time.perf_counter() - t0
    for p in group:  # the loop's wall time is shared; each item reports all of it
        p.timings.stages["denoise"] = p.timings.stages.get("denoise", 0.0) + elapsed
    return xs


def decode_many(codec: Codec, jobs: Sequence[DecodeJob]) -> list[DecodeOutcome]:
    """Decode several streams, sharing the denoising loop among compatible ones.

    Jobs are grouped by (latent shape, sampler, steps); each group runs one step loop.
    A job that fails to parse or entropy-decode gets its own error and does not affect
    the others. Output images are identical to ``codec.decode(job.data, ...)``.
    """
    outcomes = [DecodeOutcome() for _ in jobs]
    prepared: list[_Prepared] = []
    for i, job in enumerate(jobs):
        if job.expired():
            outcomes[i].error = DecodeTimeout("decode passed its deadline before it started")
            continue
        try:
            prepared.append(_prepare(codec, i, job))
        except Exception as exc:  # noqa: BLE001 - reported per job, the others go on
            outcomes[i].error = exc
    groups: dict[tuple[Any, ...], list[_Prepared]] = {}
    for p in prepared:
        groups.setdefault((p.c_latent.shape, p.sampler_name, p.steps), []).append(p)
    fused = getattr(codec.backend, "denoise", None) is not None
    for group in groups.values():
        try:
            if fused:
                # A fused-loop backend (CUDA graph) owns the whole loop for one latent; no sharing.
                samples = [codec.sample(p.c_latent, p.sampler_name, p.steps, GaussianNoise(p.seed), p.timings)
                           for p in group]
                size = 1
            else:
                samples = _shared_loop(codec, group)
                size = len(group)
            for p, x in zip(group, samples):
                if x is None or p.job.expired():
                    outcomes[p.index].error = DecodeTimeout("decode passed its deadline and was dropped")
                    continue
                with p.timings.stage("vae_decoder"):
                    decoded, _ = codec.vae_decode(x)  # tiled when over the memory budget, as Codec.decode
                image = to_uint8_image(decoded)
                oh, ow = p.crop_hw or p.original_hw or image.shape[:2]
                out = outcomes[p.index]
                out.image, out.batch_size, out.timings = np.ascontiguousarray(image[:oh, :ow]), size, p.timings
        except Exception as exc:  # noqa: BLE001 - one failing group must not take down the batch
            log.exception("decode group of %d failed", len(group))
            for p in group:
                outcomes[p.index].error = exc
    return outcomes


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ============================================================ settings


@dataclass(frozen=True)
class ServeSettings:
    """Everything the deployment is told; plain values so it pickles to the replicas."""

    artifacts: str
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 4
    batch_wait_ms: float = 10.0
    max_queued: int = 32
    max_ongoing: int = 0  # per replica; 0: 2 * max_batch (one batch running, one forming)
    timeout_s: float = 600.0
    max_bytes: int = 64 << 20
    max_pixels: int = 2048 * 2048
    max_steps: int = 1000
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    threads: int = 0  # ORT threads per replica; 0: the CPUs the replica reserves (cpus_per_replica, >= 1)
    backend: str = "ort"
    max_memory_mb: int = 0  # per replica: the memory budget of one encode/decode (0: 90 % of physical memory)
    tile: int = 0  # VAE tiling: 0 automatic, -1 never, N pixels
    retry_after_s: int = 1
    warmup: bool = True
    # Builds the replica's codec from (artifacts, RuntimeConfig); None: runtime.pipeline.Codec.
    # A hook for tests and benchmarks that need a substitute (e.g. a deliberately slow codec).
    codec_factory: Callable[[str, RuntimeConfig], Any] | None = None

    def __post_init__(self) -> None:
        checks = (
            ("replicas", self.replicas >= 1), ("max_batch", self.max_batch >= 1),
            ("batch_wait_ms", self.batch_wait_ms >= 0), ("max_queued", self.max_queued >= 1),
            ("max_ongoing", self.max_ongoing >= 0), ("timeout_s", self.timeout_s > 0),
            ("max_bytes", self.max_bytes > 0), ("max_pixels", self.max_pixels > 0),
            ("max_steps", 1 <= self.max_steps < 1 << 16), ("gpus_per_replica", self.gpus_per_replica >= 0),
            ("cpus_per_replica", self.cpus_per_replica >= 0), ("threads", self.threads >= 0),
            ("port", 0 < self.port < 1 << 16), ("retry_after_s", self.retry_after_s >= 0),
        )
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"invalid serve settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        self.runtime_config()  # the budget and tile fields are RuntimeConfig's, checked there

    @property
    def ongoing(self) -> int:
        return self.max_ongoing or 2 * self.max_batch

    def runtime_config(self) -> RuntimeConfig:
        # Match ORT's threads to the CPUs Ray reserved for the replica: more threads than
        # cores makes ORT's spinning thread pool collapse under contention (measured here:
        # 10x slower with 2 threads on a busy 2-core machine).
        threads = self.threads or max(1, int(self.cpus_per_replica))
        return defaults().with_(backend=self.backend, threads=threads, max_memory_mb=self.max_memory_mb, tile=self.tile)


# ============================================================ HTTP errors


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": kind, "message": ...}``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def check_content_type(header: str | None, allowed: Sequence[str]) -> None:
    media = _media_type(header)
    if media not in allowed:
        shown = media or "none"
        raise ApiError(415, "UnsupportedMediaType", f"content type {shown!r} is not accepted here; send one of {list(allowed)}")


def load_request_image(body: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8, refusing images over ``max_pixels`` before decoding them."""
    try:
        with Image.open(io.BytesIO(body)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ApiError(413, "ImageTooLarge", f"image is {w}x{h} = {w * h} pixels, the limit is {max_pixels}")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "ImageTooLarge", str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL raises SyntaxError for some broken files
        raise ApiError(400, "BadImage", f"not a readable image ({exc})") from exc


def check_stream_limits(codec: Codec, data: bytes, max_pixels: int, max_steps: int, steps: int | None) -> None:
    """Parse a stream (cheap) so bad input is refused with the runtime's message before
    queueing, and so are streams whose size or (stored) step count exceed the limits."""
    stream = codec.parse(data)
    ph, pw = stream.padded_hw
    if ph * pw > max_pixels:
        raise ApiError(413, "ImageTooLarge", f"stream decodes to {ph}x{pw} = {ph * pw} pixels, the limit is {max_pixels}")
    n = steps or stream.steps or codec.cfg.steps
    if n > max_steps:
        raise ApiError(400, "TooManySteps", f"the stream asks for {n} sampling steps, this service's limit is {max_steps}; "
                                            f"pass a smaller ?steps=")


# ============================================================ the Ray Serve application


def build_app(settings: ServeSettings) -> Any:
    """The bound Ray Serve application (imports Ray and FastAPI only here)."""
    if FastAPI is None:
        raise ImportError('Ray Serve is not installed; pip install "diffeic-runtime[serve]"')
    from ray import serve
    from ray.serve.config import BackpressureConfig
    from ray.serve.metrics import Counter, Gauge, Histogram

    app = FastAPI(
        title="DiffEIC codec service",
        description="Extreme image compression with a diffusion decoder (DiffEIC). "
                    "POST an image to /encode, POST the stream to /decode.",
        version="0.1.0",
    )

    def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"error": kind, "message": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Any:
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, exc: RequestValidationError) -> Any:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(400, "BadRequest", problems)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> Any:
        # BitstreamError and ManifestError are ValueErrors: their messages say what is wrong.
        return error_response(400, type(exc).__name__, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Any:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "InternalError", f"{type(exc).__name__}: {exc}")

    binary_body = {"requestBody": {"required": True, "content": {
        t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_CONTENT_TYPES}}}
    stream_body = {"requestBody": {"required": True, "content": {
        t: {"schema": {"type": "string", "format": "binary"}} for t in STREAM_CONTENT_TYPES}}}

    @serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.ongoing,
        max_queued_requests=settings.max_queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
        health_check_period_s=5,
        max_constructor_retry_count=3,
    )
    @serve.ingress(app)
    class DiffEICService:
        """One replica: a warm Codec, one compute thread, and the HTTP routes."""

        def __init__(self) -> None:
            t0 = time.perf_counter()
            self.settings = settings
            factory = settings.codec_factory or Codec
            self.codec = factory(settings.artifacts, settings.runtime_config())
            # One compute thread per replica: ORT already uses the replica's cores, and a
            # second concurrent job would only slow both down.
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffeic")
            if settings.warmup:
                self._warmup()
            self.pending = 0
            self.m_requests = Counter("diffeic_requests", description="HTTP requests by route and status",
                                      tag_keys=("route", "status"))
            self.m_latency = Histogram("diffeic_request_latency_s", description="request latency, seconds",
                                       boundaries=LATENCY_BOUNDS_S, tag_keys=("route",))
            self.m_queue = Gauge("diffeic_replica_queue_length",
                                 description="requests accepted by this replica and not finished")
            self.m_batch = Histogram("diffeic_decode_batch_size", description="decode jobs per shared denoising loop",
                                     boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32])
            log.info("replica ready in %.1f s (%s)", time.perf_counter() - t0, settings.artifacts)

        def _warmup(self) -> None:
            # Build every ONNX session now so the first request does not pay for it.
            enc = self.codec.encode(np.zeros((64, 64, 3), np.uint8), steps=1)
            self.codec.decode(enc.data, steps=1)

        def check_health(self) -> None:
            if self.codec is None:
                raise RuntimeError("codec not loaded")

        async def _run(self, fn: Any, *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

        async def _read_body(self, request: Request) -> bytes:
            limit = self.settings.max_bytes
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ApiError(413, "BodyTooLarge", f"body is {declared} bytes, the limit is {limit}")
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise ApiError(413, "BodyTooLarge", f"body is larger than the limit of {limit} bytes")
            if not buf:
                raise ApiError(400, "EmptyBody", "request body is empty")
            return bytes(buf)

        async def _guarded(self, route: str, work: Any) -> Any:
            """Timeout, metrics and the queue gauge around one request."""
            t0 = time.perf_counter()
            self.pending += 1
            self.m_queue.set(self.pending)
            status = 500
            try:
                result = await asyncio.wait_for(work, timeout=self.settings.timeout_s)
                status = 200
                return result
            except asyncio.TimeoutError:
                status = 504
                raise ApiError(504, "Timeout", f"request took longer than {self.settings.timeout_s} s") from None
            except ApiError as exc:
                status = exc.status
                raise
            except MemoryBudgetError as exc:
                status = 413
                raise ApiError(413, "OverMemoryBudget", str(exc)) from None
            except ValueError:
                status = 400
                raise
            finally:
                self.pending -= 1
                self.m_queue.set(self.pending)
                self.m_requests.inc(tags={"route": route, "status": str(status)})
                self.m_latency.observe(time.perf_counter() - t0, tags={"route": route})

        @app.get("/healthz")
        async def healthz(self) -> dict[str, Any]:
            m = self.codec.manifest
            return {"status": "ok", "fingerprint": m.fingerprint, "backend": self.codec.backend.name,
                    "replica_queue_length": self.pending, "max_batch": self.settings.max_batch}

        @app.post("/encode", response_class=Response, openapi_extra=binary_body,
                  responses={200: {"content": {"application/octet-stream": {}}, "description": "the DiffEIC stream"}})
        async def encode(
            self, request: Request,
            format: str | None = Query(None, description=f"container, one of {list(CONTAINERS)}"),
            coder: str | None = Query(None, description=f"rANS stream format, one of {list(CODER_FORMATS)}"),
            seed: int | None = Query(None, ge=0, lt=1 << 64, description="noise seed stored in the stream"),
            sampler: str | None = Query(None, description=f"sampler the decoder should use, one of {list(SAMPLERS)}"),
            steps: int | None = Query(None, ge=1, description="sampling steps the decoder should use"),
        ) -> Any:
            async def work() -> Any:
                check_content_type(request.headers.get("content-type"), IMAGE_CONTENT_TYPES)
                if steps is not None and steps > self.settings.max_steps:
                    raise ApiError(400, "TooManySteps", f"steps={steps} is above this service's limit of {self.settings.max_steps}")
                body = await self._read_body(request)
                if sampler is not None and steps is None and sampler in SAMPLERS:
                    n_steps = default_steps(sampler)  # DPM-Solver++ has its own default (20)
                else:
                    n_steps = steps
                overrides = {"container": format, "coder_format": coder, "seed": seed, "sampler": sampler,
                             "steps": n_steps}
                cfg = self.codec.cfg.with_(**overrides)  # validates (ValueError -> 400) before queueing compute
                make_sampler(cfg.sampler, cfg.steps, self.codec.schedule)  # refuse streams no decoder could sample

                def job() -> Any:
                    return self.codec.encode(load_request_image(body, self.settings.max_pixels), **overrides)

                result = await self._run(job)
                return Response(result.data, media_type="application/octet-stream", headers={
                    "X-DiffEIC-Bpp": f"{result.bpp:.6f}", "X-DiffEIC-Container": result.stream.container})

            return await self._guarded("encode", work())

        @app.post("/decode", response_class=Response, openapi_extra=stream_body,
                  responses={200: {"content": {"image/png": {}}, "description": "the decoded image"}})
        async def decode(
            self, request: Request,
            steps: int | None = Query(None, ge=1, description="sampling steps (default: from the stream)"),
            sampler: str | None = Query(None, description=f"sampler, one of {list(SAMPLERS)} (default: from the stream)"),
            size: str | None = Query(None, description="HxW crop for reference-layout streams (they carry no size)"),
        ) -> Any:
            t_start = time.monotonic()

            async def work() -> Any:
                check_content_type(request.headers.get("content-type"), STREAM_CONTENT_TYPES)
                if sampler is not None and sampler not in SAMPLERS:
                    raise ApiError(400, "BadSampler", f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
                if steps is not None and steps > self.settings.max_steps:
                    raise ApiError(400, "TooManySteps", f"steps={steps} is above this service's limit of {self.settings.max_steps}")
                crop = parse_size(size)
                body = await self._read_body(request)
                check_stream_limits(self.codec, body, self.settings.max_pixels, self.settings.max_steps, steps)
                outcome: DecodeOutcome = await self.decode_batched(
                    DecodeJob(body, sampler, steps, crop, deadline=t_start + self.settings.timeout_s))
                if outcome.error is not None:
                    raise outcome.error
                png = await asyncio.get_running_loop().run_in_executor(None, png_bytes, outcome.image)
                return Response(png, media_type="image/png",
                                headers={"X-DiffEIC-Batch-Size": str(outcome.batch_size)})

            return await self._guarded("decode", work())

        @serve.batch(max_batch_size=settings.max_batch, batch_wait_timeout_s=settings.batch_wait_ms / 1000.0)
        async def decode_batched(self, jobs: list[DecodeJob]) -> list[DecodeOutcome]:
            outcomes: list[DecodeOutcome] = await self._run(decode_many, self.codec, jobs)
            for o in outcomes:
                if o.error is None:
                    self.m_batch.observe(o.batch_size)
            return outcomes

    return DiffEICService.bind()


def parse_size(size: str | None) -> tuple[int, int] | None:
    if not size:
        return None
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ApiError(400, "BadSize", f"size must look like 120x180, got {size!r}") from None
    if min(h, w) < 1:
        raise ApiError(400, "BadSize", f"size must be positive, got {size!r}")
    return h, w


# ============================================================ start / stop


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and benchmarks on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def pin_ray_to_loopback() -> None:
    """Make the next local Ray instance of this process use 127.0.0.1 for all its ports.

    By default Ray picks the address of the default-route interface and listens on all
    interfaces; a service meant for loopback should not open ports elsewhere. Ray does
    this itself on macOS/Windows, switched by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``;
    that variable is read when ray is imported, so the constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # another Ray version: the variable alone must do
        log.warning("could not pin Ray to loopback; it may listen on other interfaces")


def init_ray(settings: ServeSettings, ray_init: dict[str, Any] | None = None) -> None:
    """Start a local Ray instance, or join the cluster named by ``RAY_ADDRESS``; no-op if connected.

    A local instance for a loopback service keeps Ray's own ports on loopback too.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            if settings.host in LOOPBACK_HOSTS:
                pin_ray_to_loopback()
            # Logical CPUs: never fewer than the replicas ask for, so a small machine can still place them.
            kwargs["num_cpus"] = max(os.cpu_count() or 1, int(np.ceil(settings.replicas * settings.cpus_per_replica)) + 1)
        kwargs.update(ray_init or {})
        ray.init(**kwargs)


def start(settings: ServeSettings, ray_init: dict[str, Any] | None = None, app_name: str = APP_NAME,
          route_prefix: str = "/") -> str:
    """Start (or join) Ray, deploy the service, and return its base URL once it is ready.

    The artifact directory is checked here first, so a bad path fails fast with the
    manifest's message instead of as a crash-looping replica. Serve's HTTP options are
    cluster-wide: if Serve already runs, its host and port stay as they are.
    """
    from ray import serve

    if settings.codec_factory is None:
        artifacts = str(load_manifest(settings.artifacts)[1].resolve())
        settings = dataclasses.replace(settings, artifacts=artifacts)
    init_ray(settings, ray_init)
    serve.start(http_options={"host": settings.host, "port": settings.port,
                              # The app enforces timeout_s itself; the proxy's bound is a backstop.
                              "request_timeout_s": settings.timeout_s + 30})
    serve.run(build_app(settings), name=app_name, route_prefix=route_prefix, blocking=False)
    url = f"http://{settings.host}:{settings.port}{route_prefix.rstrip('/')}"
    log.info("DiffEIC service ready at %s (%d replica(s))", url, settings.replicas)
    return url


def stop(shutdown_ray: bool = True) -> None:
    """Remove the service, stop Serve and (by default) this process's Ray connection."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if shutdown_ray:
                ray.shutdown()


def replica_actor_names(app_name: str = APP_NAME) -> list[str]:
    """Names of this service's live replica actors (namespace ``serve``), e.g. to kill one in a fault test."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


# ============================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    d = ServeSettings(artifacts="")
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    p.add_argument("--engines", required=True, help="artifact directory from `python -m export`")
    p.add_argument("--replicas", type=int, default=d.replicas, help="Codec replicas (default: %(default)s)")
    p.add_argument("--host", default=d.host, help="address the HTTP proxy binds (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="HTTP port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="decode jobs per shared loop (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms, help="batching window, ms")
    p.add_argument("--max-queued", type=int, default=d.max_queued, help="queued requests before 503 + Retry-After")
    p.add_argument("--max-ongoing", type=int, default=d.max_ongoing, help="requests in a replica at once (0: 2 x max-batch)")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per-request timeout, seconds")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="largest request body, bytes")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest image (input or decoded), pixels")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="largest sampling step count a request may ask for")
    p.add_argument("--gpus-per-replica", type=float, default=d.gpus_per_replica, help="num_gpus per replica (0: CPU)")
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica, help="num_cpus per replica")
    p.add_argument("--threads", type=int, default=d.threads, help="ORT threads per replica (0: --cpus-per-replica, at least 1)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--max-memory", default="auto", metavar="SIZE",
                   help="memory budget of one encode/decode per replica, e.g. 8G (default: 90%% of physical memory)")
    p.add_argument("--tile", default="auto", metavar="PX", help="VAE tiles: auto, off, or a tile side in pixels")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up encode/decode of each replica")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = ServeSettings(
            artifacts=args.engines, replicas=args.replicas, host=args.host, port=args.port,
            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queued=args.max_queued,
            max_ongoing=args.max_ongoing, timeout_s=args.timeout_s, max_bytes=args.max_bytes,
            max_pixels=args.max_pixels, max_steps=args.max_steps, gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica, threads=args.threads, backend=args.backend,
            max_memory_mb=parse_memory(args.max_memory), tile=parse_tile(args.tile), warmup=not args.no_warmup,
        )
        load_manifest(settings.artifacts)
    except (ValueError, FileNotFoundError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        print('error: Ray Serve is not installed; pip install "diffeic-runtime[serve]"', file=sys.stderr)
        return 2
    done = threading.Event()
    try:
        init_ray(settings)
        # After ray.init, which installs its own fatal-signal handlers (SIGTERM would abort
        # the process without shutting Serve down); a signal during deployment stops after it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        url = start(settings)
        print(f"serving at {url} (POST /encode, POST /decode, GET /healthz, /docs); Ctrl-C stops", file=sys.stderr)
        done.wait()
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
