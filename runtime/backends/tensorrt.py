"""TensorRT backend: runs the ``.plan`` engines recorded in the manifest on an NVIDIA GPU.

This module owns:

* the engine compatibility rules (:func:`check_engine_compat`: same TensorRT flavour
  and version, same GPU model or compute capability, same model fingerprint),
* device-buffer planning (:func:`plan_buffers`, :class:`Arena`): one arena per engine
  context, sized from the actual shapes, reused while images keep the same size and
  grown (freed, then reallocated) only when a larger one arrives,
* the CUDA-graph denoising loop (:meth:`TrtBackend.denoise`, :class:`GraphCache`), and
* the per-step sampler table layout (:func:`step_table`) shared with
  ``export/build_engines.py``, which builds the matching ``sampler_step_<kind>`` engine.

Networks with no engine (the entropy-parsing networks: hyper decoder and context model,
which must compute bit-identical floats on both sides and therefore stay FP32) are
delegated to a composed :class:`~runtime.backends.onnxruntime.OrtBackend`.

Device memory, streams and graphs use **cuda-python** (``cuda.bindings.runtime``, or
``cuda.cudart`` in older releases) rather than pycuda or torch: it is NVIDIA's thin,
1:1 binding of the CUDA runtime API, a small wheel with no compiler or torch dependency,
and it exposes stream capture and graph instantiate/launch, which the denoising loop
needs. The runtime thus stays numpy + TensorRT + cuda-python.

Denoising with CUDA graphs: one step = ``control_unet`` + ``sampler_step_<kind>``.
The sampler-step engine reads step i's coefficients, timestep and (DDPM) noise from
device tables by an int32 index buffer and writes the next latent, the next index and
the next timestep. TensorRT does not allow an engine to write an input buffer, so the
latent and the index ping-pong between two buffers and two graphs are captured (A reads
x_a/idx_a and writes x_b/idx_b, B the reverse); step i replays graph ``i % 2``. All
tables and the DDPM noise of every step are uploaded once per image, the only host
synchronisation per image is the final copy of the latent back.

``tensorrt``/``tensorrt_rtx`` and cuda-python are imported lazily, so the pure helpers
here import and are tested on machines with neither. Everything that touches a GPU is
UNVERIFIED in this repository's CI (no GPU there): see docs/tensorrt.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from ..config import RuntimeConfig
from ..engines import (
    SAMPLER_STEP_PREFIX,
    STEP_COEF_KEYS,
    engine_io_names,
    import_cudart,
    import_tensorrt,
    normalize_cc,
    trt_version_string,
)
from ..manifest import MANIFEST_NAME, EngineEntry, Manifest, ManifestError, verify_file

log = logging.getLogger(__name__)

ALIGNMENT = 256  # cudaMalloc alignment; TensorRT wants >= 16 bytes, 256 keeps every tensor coalesced
DENOISE_NETWORK = "control_unet"

class EngineCompatError(ManifestError):
    """An engine cannot run here (other TensorRT version, other GPU, other model)."""


class NonFiniteOutputError(RuntimeError):
    """An engine produced NaN or Inf (typically FP16 overflow)."""


# --------------------------------------------------------------------------- compatibility


def _split_version(s: str) -> tuple[str, tuple[int, ...]]:
    m = re.fullmatch(r"(?:(tensorrt(?:_rtx)?)-)?(\d+(?:\.\d+)*)(?:\S*)", s.strip())
    if not m:
        raise EngineCompatError(f"unrecognised TensorRT version string {s!r}")
    flavour = m.group(1) or "tensorrt"
    return flavour, tuple(int(p) for p in m.group(2).split("."))


def check_engine_compat(entry: EngineEntry, runtime_trt_version: str, gpu_name: str, cc: str,
                        fingerprint: str | None = None, engine_fingerprint: str | None = None,
                        allow_other_gpu: bool = False) -> None:
    """Raise :class:`EngineCompatError` if ``entry`` cannot run on this runtime and GPU.

    * TensorRT flavour and major.minor.patch must equal the runtime's (plans are not
      portable across versions; the build number may differ).
    * Compute capability must match. An AOT engine (``gpu`` = ``"AOT:<cc>"``, built
      without a GPU by TensorRT-RTX) is accepted on any GPU of that capability; otherwise
      the GPU model name must match too, because tactics are timed on that model
      (``allow_other_gpu`` turns this into a warning).
    * ``engine_fingerprint`` (recorded at build time) must equal the artifacts'
      ``fingerprint``: an engine left over from another export is refused.
    """
    what = f"engine {entry.file} ({entry.network})"
    e_flavour, e_ver = _split_version(entry.trt_version)
    r_flavour, r_ver = _split_version(runtime_trt_version)
    if e_flavour != r_flavour or e_ver[:3] != r_ver[:3]:
        raise EngineCompatError(
            f"{what} was built with {entry.trt_version}, this runtime has {runtime_trt_version}; "
            "rebuild the engines here (python -m export.build_engines ARTIFACTS) or use --backend ort"
        )
    want_cc, have_cc = normalize_cc(entry.compute_capability), normalize_cc(cc)
    if want_cc != have_cc:
        raise EngineCompatError(
            f"{what} was built for compute capability {want_cc} ({entry.gpu}), this GPU ({gpu_name}) is {have_cc}; "
            "rebuild the engines on this GPU (python -m export.build_engines ARTIFACTS) or use --backend ort"
        )
    if not entry.gpu.startswith("AOT:") and entry.gpu.strip() != gpu_name.strip():
        msg = (f"{what} was built on {entry.gpu!r}, this GPU is {gpu_name!r} (same compute capability {have_cc}); "
               "rebuild the engines on this GPU for tuned tactics")
        if not allow_other_gpu:
            raise EngineCompatError(msg + ", or allow it explicitly (allow_other_gpu=True)")
        log.warning("%s", msg)
    if fingerprint is not None and engine_fingerprint is not None and engine_fingerprint != fingerprint:
        raise EngineCompatError(
            f"{what} was built from a model with fingerprint {engine_fingerprint[:16]}..., these artifacts are "
            f"{fingerprint[:16]}...; the engines are stale: rebuild them (python -m export.build_engines ARTIFACTS)"
        )


# --------------------------------------------------------------------------- buffer planning


@dataclass(frozen=True)
class TensorIO:
    """One engine I/O tensor: name, numpy dtype name, shape (-1 for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    is_input: bool


@dataclass(frozen=True)
class BufferPlan:
    """Byte sizes and arena offsets of every tensor for one set of concrete shapes."""

    shapes: Mapping[str, tuple[int, ...]]
    sizes: Mapping[str, int]
    offsets: Mapping[str, int]
    total: int


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def plan_buffers(io_specs: Sequence[TensorIO], shapes: Mapping[str, Sequence[int]],
                 profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
                 alignment: int = ALIGNMENT) -> BufferPlan:
    """Lay every tensor of ``io_specs`` out in one arena for the given concrete ``shapes``.

    Checks that each shape has the spec's rank, agrees with its static dims and (inputs,
    with ``profile`` given as name -> (min, opt, max) shapes) lies inside the profile.
    Each tensor starts at a multiple of ``alignment``; a zero-size tensor still gets its
    own (empty) slot so every tensor has a distinct valid address.
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    sizes: dict[str, int] = {}
    offsets: dict[str, int] = {}
    out_shapes: dict[str, tuple[int, ...]] = {}
    cursor = 0
    for spec in io_specs:
        if spec.name not in shapes:
            raise ValueError(f"no shape given for tensor {spec.name!r}")
        shape = tuple(int(d) for d in shapes[spec.name])
        if len(shape) != len(spec.shape):
            raise ValueError(f"{spec.name}: shape {shape} has rank {len(shape)}, the engine expects {spec.shape}")
        for k, (got, want) in enumerate(zip(shape, spec.shape)):
            if got < 0:
                raise ValueError(f"{spec.name}: axis {k} is unresolved ({shape})")
            if want >= 0 and got != want:
                raise ValueError(f"{spec.name}: shape {shape} does not match the engine's static shape {spec.shape}")
        if profile is not None and spec.is_input and spec.name in profile:
            lo, _, hi = profile[spec.name]
            if any(not (a <= g <= b) for g, a, b in zip(shape, lo, hi)):
                raise ValueError(
                    f"{spec.name}: shape {shape} is outside the engine profile {tuple(lo)}..{tuple(hi)}; "
                    "rebuild the engines with a larger --max (or smaller --min), or use --backend ort"
                )
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        offsets[spec.name] = cursor
        sizes[spec.name] = nbytes
        out_shapes[spec.name] = shape
        cursor += _align(max(nbytes, 1), alignment)
    return BufferPlan(out_shapes, sizes, offsets, cursor)


class Arena:
    """One device allocation reused across calls; grows (free + alloc) only when too small.

    ``alloc(nbytes) -> ptr`` and ``free(ptr)`` are injected so the bookkeeping is testable
    without a GPU. Growth rounds up to 1 MiB to avoid reallocations for small increases.
    """

    GRANULE = 1 << 20

    def __init__(self, alloc: Callable[[int], int], free: Callable[[int], None]) -> None:
        self._alloc, self._free = alloc, free
        self.ptr = 0
        self.capacity = 0
        self.allocations = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.release()
            cap = _align(max(nbytes, 1), self.GRANULE)
            self.ptr = self._alloc(cap)
            self.capacity = cap
            self.allocations += 1
        return self.ptr

    def addresses(self, plan: BufferPlan) -> dict[str, int]:
        base = self.ensure(plan.total)
        return {name: base + off for name, off in plan.offsets.items()}

    def release(self) -> None:
        if self.ptr:
            self._free(self.ptr)
        self.ptr, self.capacity = 0, 0


_AXIS_DIM = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:/+\s*(\d+))?\s*$")


def profile_admits(profile: Mapping[str, Sequence[int]], inputs: Sequence[Any],
                   shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether concrete input ``shapes`` fit an engine ``profile`` (axis -> (min, opt, max)).

    ``inputs`` are the network's TensorSpecs (dims: ints, axis names or ``name/k``); axes the
    profile does not name are not judged here (TensorRT checks them when shapes are set).
    """
    for spec in inputs:
        if spec.name not in shapes:
            continue
        shape = tuple(int(d) for d in shapes[spec.name])
        if len(shape) != len(spec.shape):
            return False
        for dim, got in zip(spec.shape, shape):
            if isinstance(dim, int):
                if dim != got:
                    return False
                continue
            m = _AXIS_DIM.match(str(dim))
            if not m or m.group(1) not in profile:
                continue
            lo, _, hi = (int(v) for v in profile[m.group(1)])
            k = int(m.group(2) or 1)
            if not max(lo // k, 1) <= got <= max(hi // k, 1):
                return False
    return True


# --------------------------------------------------------------------------- graph cache


@dataclass
class GraphRecord:
    """A captured graph (or pair) and whatever must live as long as it (buffers, contexts)."""

    graph: Any
    resources: Any = None
    replays: int = 0


class GraphCache:
    """Captured CUDA graphs keyed by (network, shapes), least recently used evicted first.

    ``capture()`` is only called on a miss; ``destroy(record)`` on eviction and ``clear``.
    Capture and replay counters make the bookkeeping observable (and unit-testable).
    """

    def __init__(self, destroy: Callable[[GraphRecord], None], max_entries: int = 2) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._destroy = destroy
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, GraphRecord] = OrderedDict()
        self.captures = 0
        self.hits = 0

    @staticmethod
    def key(network: str, shapes: Mapping[str, Sequence[int]], *extra: Hashable) -> tuple:
        return (network, tuple(sorted((k, tuple(int(d) for d in v)) for k, v in shapes.items())), *extra)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, capture: Callable[[], GraphRecord]) -> GraphRecord:
        rec = self._entries.get(key)
        if rec is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return rec
        while len(self._entries) >= self.max_entries:
            _, old = self._entries.popitem(last=False)
            self._destroy(old)
        rec = capture()
        self.captures += 1
        self._entries[key] = rec
        return rec

    def replay(self, key: Hashable, launch: Callable[[Any], None]) -> None:
        rec = self._entries[key]
        launch(rec.graph)
        rec.replays += 1

    def clear(self) -> None:
        while self._entries:
            _, rec = self._entries.popitem(last=False)
            self._destroy(rec)


# --------------------------------------------------------------------------- sampler tables


def sampler_kind(sampler: Any) -> str:
    name = str(getattr(sampler, "name", "")).lower()
    if name not in STEP_COEF_KEYS:
        raise ValueError(f"no sampler-step engine layout for sampler {name!r}; known: {sorted(STEP_COEF_KEYS)}")
    return name


def step_table(sampler: Any) -> tuple[np.ndarray, np.ndarray]:
    """(coefs float32 [n, K], t float32 [n]) for every sampling step, in sampling order.

    Row i holds the columns ``STEP_COEF_KEYS[kind]`` of ``sampler.coefficients(i)``; the
    sampler-step engine gathers row ``idx`` so that one captured graph serves every step.
    """
    kind = sampler_kind(sampler)
    n = len(sampler.timesteps)
    coefs = np.empty((n, len(STEP_COEF_KEYS[kind])), np.float32)
    for i in range(n):
        c = dict(sampler.coefficients(i))
        if kind == "ddpm":
            c["noise_scale"] = np.float32(np.float32(c["noise_mask"]) * np.float32(c["sqrt_variance"]))
        coefs[i] = [np.float32(c[k]) for k in STEP_COEF_KEYS[kind]]
    t = np.asarray(sampler.timesteps, dtype=np.float32).copy()
    return coefs, t


def check_finite(network: str, name: str, array: np.ndarray, precision: str) -> None:
    """Raise :class:`NonFiniteOutputError` with a remedy if ``array`` holds NaN/Inf."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        hint = ("FP16 overflow is the usual cause: rebuild this engine in FP32 "
                "(python -m export.build_engines ARTIFACTS --networks %s, without --fp16) or decode with "
                "--backend ort" % network) if precision == "fp16" else "check the inputs and the artifacts"
        raise NonFiniteOutputError(f"{network}: output {name!r} has {bad} non-finite values ({precision} engine); {hint}")


# --------------------------------------------------------------------------- device layer (GPU only)


class _Cuda:
    """The few CUDA runtime calls this backend makes, with errors turned into exceptions."""

    def __init__(self) -> None:
        self.rt = import_cudart()

    def call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, msg = self.rt.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {int(err)}: {msg.decode() if isinstance(msg, bytes) else msg}")
        return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)

    def device(self) -> tuple[str, str]:
        dev = self.call(self.rt.cudaGetDevice())
        prop = self.call(self.rt.cudaGetDeviceProperties(dev))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def malloc(self, n: int) -> int:
        return int(self.call(self.rt.cudaMalloc(n)))

    def free(self, ptr: int) -> None:
        self.call(self.rt.cudaFree(ptr))

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        src = np.ascontiguousarray(src)
        self.call(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.call(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream: Any) -> None:
        self.call(self.rt.cudaStreamSynchronize(stream))


@dataclass
class _Engine:
    """A deserialized engine, its default execution context and its I/O."""

    entry: EngineEntry
    engine: Any
    context: Any
    io: tuple[TensorIO, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    arena: Arena
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def inputs(self) -> list[TensorIO]:
        return [t for t in self.io if t.is_input]

    @property
    def outputs(self) -> list[TensorIO]:
        return [t for t in self.io if not t.is_input]


def _engine_io(trt: Any, engine: Any) -> tuple[tuple[TensorIO, ...], dict]:
    io, profile = [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_in = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        io.append(TensorIO(name, dtype, tuple(int(d) for d in engine.get_tensor_shape(name)), is_in))
        if is_in:
            lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
            profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return tuple(io), profile


class NotCapturableError(RuntimeError):
    """The denoising step cannot be captured into a CUDA graph; the loop runs step by step."""


def _set_shapes(eng: _Engine, ctx: Any, shapes: Mapping[str, Sequence[int]]) -> None:
    for name, shape in shapes.items():
        if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
            raise RuntimeError(f"{eng.entry.network}: TensorRT refused input shape {tuple(shape)} for {name!r} "
                               f"(profile {eng.profile.get(name)}; see the TensorRT log)")


def _set_addresses(eng: _Engine, ctx: Any, addrs: Mapping[str, int]) -> None:
    for name, ptr in addrs.items():
        if not ctx.set_tensor_address(name, int(ptr)):
            raise RuntimeError(f"{eng.entry.network}: TensorRT refused the address of {name!r} (see the TensorRT log)")


def _device_memory_size(engine: Any) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1 (the old name is deprecated)
    return int(size if size is not None else getattr(engine, "device_memory_size", 0))


class TrtBackend:
    """Runs engines listed in the manifest; everything else through ONNX Runtime (FP32)."""

    name = "trt"

    def __init__(self, manifest: Manifest, directory: Path, cfg: RuntimeConfig,
                 allow_other_gpu: bool = False, max_graphs: int = 2) -> None:
        self.manifest, self.directory, self.cfg = manifest, directory, cfg
        raw = _raw_engine_records(directory)
        flavours = {_split_version(e.trt_version)[0] for e in manifest.engines.values()}
        self.trt = import_tensorrt(next(iter(flavours)) if len(flavours) == 1 else None)
        self.cuda = _Cuda()
        self.gpu_name, self.cc = self.cuda.device()
        self.trt_version = trt_version_string(self.trt.__name__, self.trt.__version__)
        # Refuse incompatible engines up front, with the reason, before any decode starts.
        for key, entry in manifest.engines.items():
            check_engine_compat(entry, self.trt_version, self.gpu_name, self.cc, manifest.fingerprint,
                                raw.get(key, {}).get("fingerprint"), allow_other_gpu)
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        self.stream = self.cuda.call(self.cuda.rt.cudaStreamCreate())
        self._engines: dict[str, _Engine] = {}
        self._ort: Any = None
        self._graphs = GraphCache(self._destroy_graph, max_graphs)
        self._uncapturable: dict[Hashable, str] = {}  # loop keys whose capture failed, and why
        log.info("TensorRT %s on %s (cc %s), %d engines", self.trt_version, self.gpu_name, self.cc,
                 len(manifest.engines))
        if not manifest.engines:
            log.warning("%s lists no engines: every network runs on ONNX Runtime "
                        "(build them with python -m export.build_engines %s)", MANIFEST_NAME, directory)

    # ---------------------------------------------------------------- engine selection
    def _entries_for(self, network: str) -> list[tuple[str, EngineEntry]]:
        return [(k, e) for k, e in self.manifest.engines.items() if e.network == network]

    def has_engine(self, network: str) -> bool:
        return bool(self._entries_for(network))

    def has(self, network: str) -> bool:
        return self.has_engine(network) or network in self.manifest.networks

    def graph_for(self, network: str) -> str:
        return network

    def admits(self, network: str, height: int, width: int) -> bool:
        """Whether ``network`` can run for a padded ``height`` x ``width`` image here: some engine's
        profile admits it, or it has no engine (it then runs on ONNX Runtime)."""
        entries = self._entries_for(network)
        spec = self.manifest.networks.get(network)
        if not entries or spec is None:
            return True
        shapes = {t.name: t.concrete(height, width) for t in spec.inputs}
        return any(profile_admits(e.profile, spec.inputs, shapes) for _, e in entries)

    def _engine(self, network: str, shapes: Mapping[str, Sequence[int]] | None = None) -> _Engine:
        """The engine for ``network``; a static engine whose profile admits ``shapes`` wins over
        the dynamic one (decided from the manifest, so unused static plans are never loaded)."""
        entries = self._entries_for(network)
        spec = self.manifest.networks.get(network)
        chosen = None
        for key, entry in entries:
            if entry.static_shape:
                if shapes is not None and spec is not None and profile_admits(entry.profile, spec.inputs, shapes):
                    return self._load(key, entry)
            elif chosen is None:
                chosen = (key, entry)
        if chosen is None:
            raise ManifestError(f"no engine for {network!r} matches shapes {dict(shapes or {})}")
        return self._load(*chosen)

    def _load(self, key: str, entry: EngineEntry) -> _Engine:
        eng = self._engines.get(key)
        if eng is not None:
            return eng
        path = (verify_file(self.directory, entry.file, entry.sha256, f"engine {key}") if self.cfg.verify_hashes
                else self.directory / entry.file)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineCompatError(f"TensorRT could not deserialize {path} (see the TensorRT log above); rebuild it")
        io, profile = _engine_io(self.trt, engine)
        eng = _Engine(entry, engine, engine.create_execution_context(), io, profile,
                      Arena(self.cuda.malloc, self.cuda.free))
        self._engines[key] = eng
        log.debug("loaded engine %s (%s, %s)", key, entry.precision, entry.file)
        return eng

    # ---------------------------------------------------------------- plain execution
    def _bind(self, eng: _Engine, context: Any, arena: Arena,
              input_shapes: Mapping[str, Sequence[int]]) -> tuple[BufferPlan, dict[str, int]]:
        """Set input shapes, plan and bind every buffer; returns the plan and addresses."""
        for t in eng.inputs:
            if t.name not in input_shapes:
                raise ValueError(f"{eng.entry.network}: missing input {t.name!r}")
        shapes = {t.name: tuple(int(d) for d in input_shapes[t.name]) for t in eng.inputs}
        # The profile check first: it names the remedy; TensorRT would only log and return False.
        plan_buffers([t for t in eng.io if t.is_input], shapes, eng.profile)
        _set_shapes(eng, context, shapes)
        shapes.update({t.name: tuple(context.get_tensor_shape(t.name)) for t in eng.outputs})
        plan = plan_buffers(eng.io, shapes, eng.profile)
        addrs = arena.addresses(plan)
        _set_addresses(eng, context, addrs)
        return plan, addrs

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.has_engine(network):
            return self._fallback().run(network, inputs)
        eng = self._engine(network, {k: v.shape for k, v in inputs.items()})
        plan, addrs = self._bind(eng, eng.context, eng.arena, {k: v.shape for k, v in inputs.items()})
        for t in eng.inputs:
            self.cuda.h2d(addrs[t.name], np.ascontiguousarray(inputs[t.name], dtype=t.dtype), self.stream)
        if not eng.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{network}: TensorRT enqueue failed (see the TensorRT log)")
        outs = {t.name: np.empty(plan.shapes[t.name], t.dtype) for t in eng.outputs}
        for name, arr in outs.items():
            self.cuda.d2h(arr, addrs[name], self.stream)
        self.cuda.sync(self.stream)
        for name, arr in outs.items():
            check_finite(network, name, arr, eng.entry.precision)
        return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in outs.items()}

    def _fallback(self) -> Any:
        if self._ort is None:
            from .onnxruntime import OrtBackend

            self._ort = OrtBackend(self.manifest, self.directory, self.cfg)
        return self._ort

    # ---------------------------------------------------------------- denoising loop
    def denoise(self, sampler: Any, x_T: np.ndarray, c_latent: np.ndarray, noise_source: Any,
                callback: Callable[[int, Any, Any, Any], None] | None = None) -> np.ndarray:
        """The whole sampling loop on the GPU; returns the final latent (float32, host).

        Falls back to the host loop (``runtime.sampler.run``) when there is no
        ``control_unet`` engine, no ``sampler_step_<kind>`` engine, or the engines cannot be
        captured into a CUDA graph (``is_stream_capturable``). With CUDA graphs the host
        never sees intermediate latents, so ``callback(i, t, None, None)`` is called as each
        step is enqueued (progress only), not when it completes.
        """
        from ..sampler import run as host_run

        kind = str(getattr(sampler, "name", "")).lower()
        step_net = SAMPLER_STEP_PREFIX + kind
        x_T = np.ascontiguousarray(x_T, np.float32)
        shape = tuple(x_T.shape)
        n = len(sampler.timesteps)
        key = GraphCache.key("denoise", {"x": shape, "c_latent": c_latent.shape}, kind, n)
        reason = None
        if kind not in STEP_COEF_KEYS:
            reason = f"no sampler-step engine layout for sampler {kind!r}"
        elif not (self.has_engine(DENOISE_NETWORK) and self.has_engine(step_net)):
            reason = f"no {step_net if self.has_engine(DENOISE_NETWORK) else DENOISE_NETWORK} engine"
        elif key in self._uncapturable:
            reason = self._uncapturable[key]
        rec = None
        if reason is None:
            try:
                rec = self._graphs.get(key, lambda: self._capture_denoise(step_net, shape, c_latent.shape, n, kind))
            except NotCapturableError as exc:
                # only the text: a kept exception would hold its frames, and with them the
                # engines and device memory, alive (log handlers keep their records' args)
                reason = self._uncapturable[key] = str(exc)
                log.warning("CUDA graph capture not possible (%s): the denoising loop runs step by step", reason)
        if rec is None:
            log.info("denoising loop runs on the host: %s", reason)

            def model_fn(x: np.ndarray, t: Any) -> np.ndarray:
                return self.run(DENOISE_NETWORK, {"x_t": x, "t": np.array([t], np.float32), "c_latent": c_latent})["eps"]

            return host_run(sampler, x_T, model_fn, noise_source, callback)

        coefs, t_table = step_table(sampler)
        noise = None
        if sampler.needs_noise():  # every step's noise, drawn in the official order, uploaded once
            noise_source.check(sampler, shape)
            noise = np.stack([noise_source.step_noise(i, shape) for i in range(n)]).astype(np.float32)  # (n, 1, C, h, w)
        bufs, sizes = rec.resources["buffers"], rec.resources["sizes"]
        # Per-image state: tables, noise, conditioning, x_T, index 0, t of step 0 (and the
        # multistep memory, zero: finite, and multiplied by 0 in the first step).
        self.cuda.h2d(bufs["coefs"], coefs, self.stream)
        self.cuda.h2d(bufs["t_table"], t_table, self.stream)
        if noise is not None:
            self.cuda.h2d(bufs["noise"], noise, self.stream)
        self.cuda.h2d(bufs["c_latent"], np.ascontiguousarray(c_latent, np.float32), self.stream)
        self.cuda.h2d(bufs["x_a"], x_T, self.stream)
        self.cuda.h2d(bufs["idx_a"], np.zeros(1, np.int32), self.stream)
        self.cuda.h2d(bufs["t"], t_table[:1], self.stream)
        if "m_a" in bufs:
            self.cuda.call(self.cuda.rt.cudaMemsetAsync(bufs["m_a"], 0, sizes["m_a"], self.stream))
        for i in range(n):
            self._graphs.replay(key, lambda g, i=i: self.cuda.call(self.cuda.rt.cudaGraphLaunch(g[i % 2], self.stream)))
            if callback is not None:
                callback(i, t_table[i].item(), None, None)
        out = np.empty(shape, np.float32)
        self.cuda.d2h(out, bufs["x_b"] if n % 2 else bufs["x_a"], self.stream)
        self.cuda.sync(self.stream)  # the one host synchronisation of the loop
        precision = self._entries_for(DENOISE_NETWORK)[0][1].precision
        # NaN/Inf in any step's eps propagates through the affine update to the final
        # latent, so checking it once here catches an overflow at any step.
        check_finite(DENOISE_NETWORK, "x_0 (denoised latent)", out, precision)
        return out

    def _graph_context(self, eng: _Engine, scratch: int, scratch_size: int) -> Any:
        """An execution context for one captured graph, on the shared scratch memory when the
        TensorRT version lets the application provide it (TensorRT >= 10.1)."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None and scratch and hasattr(eng.context, "set_device_memory"):
            ctx = eng.engine.create_execution_context(strategy.USER_MANAGED)
            ctx.set_device_memory(scratch, scratch_size)
            return ctx
        return eng.engine.create_execution_context()

    def _capture_denoise(self, step_net: str, shape: tuple[int, ...], c_shape: Sequence[int], n: int,
                         kind: str) -> GraphRecord:
        """Allocate the loop's buffers and capture the A/B graph pair for one (shape, n).

        Each graph gets its own pair of execution contexts: a captured graph replays the
        addresses and shapes of its capture (and TensorRT may keep per-context state for
        them), so no context is re-bound after it was captured. The four contexts run one
        after another on one stream, so they share one scratch allocation.
        """
        rt, cuda = self.cuda.rt, self.cuda
        unet_eng = self._engine(DENOISE_NETWORK, {"x_t": shape, "c_latent": tuple(c_shape), "t": (1,)})
        step_eng = self._engine(step_net)
        f32 = np.dtype(np.float32).itemsize
        numel = int(np.prod(shape))
        sizes = {"x_a": numel * f32, "x_b": numel * f32, "eps": numel * f32, "t": f32,
                 "idx_a": 4, "idx_b": 4, "c_latent": int(np.prod(c_shape)) * f32,
                 "coefs": n * len(STEP_COEF_KEYS[kind]) * f32, "t_table": n * f32}
        if kind == "ddpm":
            sizes["noise"] = n * numel * f32
        if kind == "dpmpp":
            sizes["m_a"] = sizes["m_b"] = numel * f32
        scratch_size = max(_device_memory_size(unet_eng.engine), _device_memory_size(step_eng.engine))
        bufs: dict[str, int] = {}
        execs: list[Any] = []
        contexts: list[Any] = []
        try:
            for k, v in sizes.items():
                bufs[k] = cuda.malloc(_align(v, ALIGNMENT))
            if scratch_size:
                bufs["scratch"] = cuda.malloc(_align(scratch_size, ALIGNMENT))
            for k in sizes:  # valid tables and index before the warm-up runs: the step engine gathers by index
                cuda.call(rt.cudaMemsetAsync(bufs[k], 0, sizes[k], self.stream))
            step_shapes = {"x": shape, "eps": shape, "idx": (1,), "coefs": (n, len(STEP_COEF_KEYS[kind])),
                           "t_table": (n,), "m_prev": shape}
            if kind == "ddpm":
                step_shapes["noise"] = (n, 1) + tuple(shape[1:])
            unet_shapes = {"x_t": shape, "t": (1,), "c_latent": tuple(c_shape)}
            for x_in, x_out, i_in, i_out, m_in, m_out in (("x_a", "x_b", "idx_a", "idx_b", "m_a", "m_b"),
                                                          ("x_b", "x_a", "idx_b", "idx_a", "m_b", "m_a")):
                unet_ctx = self._graph_context(unet_eng, bufs.get("scratch", 0), scratch_size)
                step_ctx = self._graph_context(step_eng, bufs.get("scratch", 0), scratch_size)
                contexts += [unet_ctx, step_ctx]
                step_binds = {"x": x_in, "eps": "eps", "idx": i_in, "coefs": "coefs", "t_table": "t_table",
                              "x_next": x_out, "idx_next": i_out, "t_next": "t"}
                if kind == "ddpm":
                    step_binds["noise"] = "noise"
                if kind == "dpmpp":
                    step_binds.update(m_prev=m_in, m_next=m_out)
                binds = ((unet_eng, unet_ctx, unet_shapes, {"x_t": x_in, "t": "t", "c_latent": "c_latent", "eps": "eps"}),
                         (step_eng, step_ctx, step_shapes, step_binds))
                for eng, ctx, shp, b in binds:
                    _set_shapes(eng, ctx, {t.name: shp[t.name] for t in eng.inputs})
                    _set_addresses(eng, ctx, {tensor: bufs[buf] for tensor, buf in b.items()})
                # Warm-up outside capture: TensorRT does shape-dependent setup on the first enqueue.
                for eng, ctx, _, _ in binds:
                    if not ctx.execute_async_v3(int(self.stream)):
                        raise RuntimeError(f"{eng.entry.network}: TensorRT enqueue failed during the denoising warm-up")
                cuda.sync(self.stream)
                for eng, ctx, _, _ in binds:
                    capturable = getattr(ctx, "is_stream_capturable", None)
                    if capturable is not None and not capturable(int(self.stream)):
                        raise NotCapturableError(f"engine {eng.entry.file} is not stream capturable (TensorRT-RTX "
                                                 "engines need BuilderFlag.REQUIRE_USER_ALLOCATION)")
                cuda.call(rt.cudaStreamBeginCapture(
                    self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
                ok = True
                try:
                    for _, ctx, _, _ in binds:
                        ok = bool(ctx.execute_async_v3(int(self.stream))) and ok
                finally:
                    err, graph = rt.cudaStreamEndCapture(self.stream)
                if int(err) != 0 or graph is None or not ok:
                    if graph is not None:
                        cuda.call(rt.cudaGraphDestroy(graph))
                    raise NotCapturableError(f"stream capture of the denoising step failed (CUDA error {int(err)}, "
                                             f"TensorRT enqueue {'ok' if ok else 'failed'})")
                try:
                    execs.append(cuda.call(rt.cudaGraphInstantiate(graph, 0)))
                finally:
                    cuda.call(rt.cudaGraphDestroy(graph))  # the exec is independent of the graph (as trtexec does)
        except BaseException:
            self._destroy_graph(GraphRecord(tuple(execs), {"buffers": bufs, "contexts": contexts}))
            raise
        log.info("captured denoising graphs for latent %s, %d steps (%s)", shape, n, kind)
        return GraphRecord(tuple(execs), {"buffers": bufs, "sizes": sizes, "contexts": contexts})

    def _destroy_graph(self, rec: GraphRecord) -> None:
        rt = self.cuda.rt
        res = rec.resources or {}
        for e in rec.graph or ():
            self.cuda.call(rt.cudaGraphExecDestroy(e))
        res.pop("contexts", None)  # contexts before the scratch memory they use
        for ptr in res.get("buffers", {}).values():
            self.cuda.free(ptr)
        res.clear()

    def close(self) -> None:
        """Free graphs, contexts, engines and device memory; idempotent."""
        if getattr(self, "_graphs", None) is not None:
            self._graphs.clear()
        for eng in getattr(self, "_engines", {}).values():
            eng.arena.release()
        self._engines = {}
        if getattr(self, "stream", None) is not None:
            self.cuda.call(self.cuda.rt.cudaStreamDestroy(self.stream))
            self.stream = None
        if self._ort is not None:
            self._ort.close()
            self._ort = None


def _raw_engine_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Engine records as written (extra keys such as ``fingerprint`` that EngineEntry does not carry)."""
    try:
        raw = json.loads((directory / MANIFEST_NAME).read_text())
        return {k: dict(v) for k, v in raw.get("engines", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


__all__ = [
    "ALIGNMENT", "Arena", "BufferPlan", "EngineCompatError", "GraphCache", "GraphRecord", "NonFiniteOutputError",
    "NotCapturableError",
    "STEP_COEF_KEYS", "SAMPLER_STEP_PREFIX", "TensorIO", "TrtBackend", "check_engine_compat", "check_finite",
    "engine_io_names", "import_tensorrt", "normalize_cc", "plan_buffers", "profile_admits", "sampler_kind", "step_table",
    "trt_version_string",
]
