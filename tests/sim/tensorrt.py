"""A strict simulator of the TensorRT 10 Python runtime API subset that the backend uses.

It stands in for ``tensorrt`` or ``tensorrt_rtx`` (same runtime API) on top of the
simulated CUDA runtime (:mod:`tests.sim.cudart`): ``Logger``, ``Runtime``,
``deserialize_cuda_engine``, ``ICudaEngine`` (I/O names, modes, dtypes, shapes, profiles,
device memory size, ``create_execution_context(strategy)``) and ``IExecutionContext``
(``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``, ``set_device_memory``,
``is_stream_capturable``, ``execute_async_v3``).

An engine executes, on the simulated device memory, the very ONNX graph its ``.plan`` was
built from: plans are known by their sha256, registered while the real TensorRT(-RTX)
builder runs (:func:`record_builds`) or made by :meth:`SimTensorRT.make_plan` around any
Python function. ``execute_async_v3`` enqueues one "kernel" on the stream with the
shapes and addresses set at that moment; it runs when the stream does, so in a CUDA graph
it replays with the captured bindings.

Rules (``RULES``), each from the TensorRT API documentation or a documented hazard, are
checked and counted; a violation raises :class:`~tests.sim.cudart.SimulatorError`.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .cudart import SimulatorError, Simulator

RULES: dict[str, str] = {
    "trt.plan": "a plan deserializes only on the TensorRT flavour/version and compute capability it was built for",
    "trt.input_shape": "set_input_shape names an input, keeps its rank and static dims, and stays inside the profile",
    "trt.address": "set_tensor_address names an I/O tensor of the engine and gives a non-null, 256-byte aligned address",
    "trt.enqueue_ready": "execute_async_v3 runs only with every input shape and every I/O address set, "
                         "each buffer live and large enough",
    "trt.io_alias": "no output buffer overlaps an input or another output of the same enqueue",
    "trt.device_memory": "a USER_MANAGED context gets 256-byte aligned device memory of at least "
                         "device_memory_size_v2 before it enqueues",
    "trt.capture_warmup": "inside a stream capture, enqueue only with the shapes of a previous enqueue outside "
                          "capture (TensorRT does shape-dependent setup on the first enqueue)",
    "trt.capturable": "a TensorRT-RTX engine is captured only when built with REQUIRE_USER_ALLOCATION",
    "trt.context_after_capture": "a context captured into a live graph exec is not re-bound, re-shaped or "
                                 "enqueued again outside that graph (the graph replays the captured bindings)",
}


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class Logger:
    Severity = Severity
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING,
                                                     Severity.INFO, Severity.VERBOSE)

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        self.min_severity = min_severity
        self.messages: list[tuple[Severity, str]] = []

    def log(self, severity: Severity, msg: str) -> None:
        self.messages.append((Severity(severity), msg))


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8
    BF16 = 7


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_FROM_NP = {np.dtype(v): k for k, v in _NP.items()}


def nptype(trt_type: DataType) -> type:
    return _NP[DataType(trt_type)]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Dims(tuple):
    """TensorRT's Dims: a tuple of ints (-1 for a dynamic dimension)."""


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1: dynamic
    is_input: bool


@dataclass
class EngineSpec:
    """What a plan stands for: its I/O, profile, build target and how to compute it."""

    name: str
    io: tuple[IOSpec, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    flavour: str
    version: str
    compute_capability: str
    execute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    output_shapes: Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]
    build_flags: frozenset[str] = frozenset()
    device_memory_size: int = 1 << 20


# --------------------------------------------------------------------------- ONNX-backed engines


def onnx_engine_spec(name: str, model_bytes: bytes,
                     profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
                     flavour: str, version: str, compute_capability: str,
                     build_flags: frozenset[str] = frozenset()) -> EngineSpec:
    """An engine that runs ``model_bytes`` (the ONNX TensorRT parsed) with ONNX Runtime on CPU."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(model_bytes)
    elem = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
            onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.BOOL: np.bool_,
            onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}
    inits = {t.name for t in model.graph.initializer}

    def spec_of(vi: Any, is_input: bool) -> IOSpec:
        t = vi.type.tensor_type
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return IOSpec(vi.name, np.dtype(elem[t.elem_type]), dims, is_input)

    io = tuple([spec_of(v, True) for v in model.graph.input if v.name not in inits]
               + [spec_of(v, False) for v in model.graph.output])
    sess: list[Any] = []
    shape_cache: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def session() -> Any:
        if not sess:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            so.log_severity_level = 3
            sess.append(ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"]))
        return sess[0]

    def execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = session()
        names = [o.name for o in s.get_outputs()]
        return dict(zip(names, s.run(names, inputs)))

    def output_shapes(in_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        # TensorRT infers output shapes from the network; the simulator asks ONNX Runtime
        # once per set of input shapes (zero inputs: shapes of these graphs never depend on values).
        key = tuple(sorted(in_shapes.items()))
        if key not in shape_cache:
            feeds = {t.name: np.zeros(in_shapes[t.name], t.dtype) for t in io if t.is_input}
            shape_cache[key] = {k: tuple(v.shape) for k, v in execute(feeds).items()}
        return shape_cache[key]

    prof = {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in profile.items()}
    return EngineSpec(name, io, prof, flavour, version, compute_capability, execute, output_shapes,  # type: ignore[arg-type]
                      frozenset(build_flags))


@contextlib.contextmanager
def record_builds(registry: dict[str, EngineSpec]) -> Iterator[dict[str, EngineSpec]]:
    """While active, every plan built by ``export.build_engines.EngineBuilder`` is registered
    (by sha256) with the ONNX graph TensorRT parsed for it, so the simulator can run it."""
    import onnx

    from export.build_engines import EngineBuilder

    original = EngineBuilder.build

    def build(self: Any, onnx_path: Any, profiles: Any, strict_fp32: bool = False,
              workspace_bytes: int | None = None) -> bytes:
        plan = original(self, onnx_path, profiles, strict_fp32, workspace_bytes)
        model = onnx.load(str(onnx_path))  # with its external data: the graph the parser saw
        registry[hashlib.sha256(plan).hexdigest()] = onnx_engine_spec(
            str(onnx_path.name), model.SerializeToString(), profiles, self.flavour, self.trt.__version__, self.cc,
            frozenset(getattr(self, "last_build_flags", ())))
        return plan

    EngineBuilder.build = build  # type: ignore[method-assign]
    try:
        yield registry
    finally:
        EngineBuilder.build = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- the runtime API


class ICudaEngine:
    def __init__(self, trt: "SimTensorRT", spec: EngineSpec) -> None:
        self._trt, self.spec = trt, spec
        self.name = spec.name
        self._io = {t.name: t for t in spec.io}
        self.num_optimization_profiles = 1

    @property
    def num_io_tensors(self) -> int:
        return len(self.spec.io)

    def get_tensor_name(self, index: int) -> str:
        return self.spec.io[int(index)].name

    def _t(self, name: str) -> IOSpec:
        if name not in self._io:
            raise RuntimeError(f"sim TensorRT: engine {self.name} has no tensor {name!r}")
        return self._io[name]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self._t(name).is_input else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return _FROM_NP[self._t(name).dtype]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._t(name).shape)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        t = self._t(name)
        if int(profile_index) != 0 or not t.is_input:
            return []
        if name in self.spec.profile:
            return [Dims(s) for s in self.spec.profile[name]]
        return [Dims(t.shape)] * 3

    @property
    def device_memory_size_v2(self) -> int:
        return self.spec.device_memory_size

    device_memory_size = device_memory_size_v2

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy =
                                 ExecutionContextAllocationStrategy.STATIC) -> "IExecutionContext":
        return IExecutionContext(self, ExecutionContextAllocationStrategy(int(strategy)))


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy) -> None:
        self.engine = engine  # keeps the engine alive, as the real bindings do
        self._trt = engine._trt
        self.strategy = strategy
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addr: dict[str, int] = {}
        self._warm_shapes: dict[str, tuple[int, ...]] | None = None
        self._mem: tuple[int, int] | None = None
        self._owned_mem = 0
        self.enqueues = 0
        if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            err, ptr = self._trt.cuda.cudaMalloc(engine.spec.device_memory_size)
            if int(err) != 0:
                raise RuntimeError(f"sim TensorRT: could not allocate context memory ({int(err)})")
            self._mem = (ptr, engine.spec.device_memory_size)
            self._owned_mem = ptr
        self._trt.contexts.add(self)

    def __del__(self) -> None:
        if self._owned_mem and not self._trt.cuda._capturing():
            self._trt.cuda.cudaFree(self._owned_mem)
            self._owned_mem = 0

    # ------------------------------------------------------------------ rules helpers
    def _check(self, rule: str, ok: bool, msg: str | Callable[[], str]) -> bool:
        self._trt.checks[rule] += 1
        if ok:
            return True
        text = msg() if callable(msg) else msg
        self._trt.logger_log(Severity.ERROR, text)
        err = SimulatorError(rule, f"{self.engine.name}: {text}")
        self._trt.cuda.violations.append(err)
        if self._trt.cuda.strict:
            raise err
        return False

    def _not_captured(self, what: str) -> bool:
        live = self._trt.cuda_live_tags()
        return self._check("trt.context_after_capture", not any(t is self for t in live),
                           f"{what} on a context whose bindings a live CUDA graph exec replays; the graph keeps the "
                           "captured addresses and shapes (use one execution context per captured graph)")

    # ------------------------------------------------------------------ shapes and addresses
    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        if not self._not_captured("set_input_shape"):
            return False
        io = self.engine._io.get(name)
        shape = tuple(int(d) for d in shape)
        if not self._check("trt.input_shape", io is not None and io.is_input, f"{name!r} is not an input"):
            return False
        assert io is not None
        ok = len(shape) == len(io.shape) and all(w < 0 or w == g for g, w in zip(shape, io.shape))
        if not self._check("trt.input_shape", ok, f"shape {shape} of {name!r} does not fit {io.shape}"):
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        inside = all(a <= g <= b for g, a, b in zip(shape, lo, hi))
        if not self._check("trt.input_shape", inside,
                           f"shape {shape} of {name!r} is outside the profile {tuple(lo)}..{tuple(hi)}"):
            return False
        self._shapes[name] = shape
        return True

    def _inputs_set(self) -> bool:
        return all(t.name in self._shapes for t in self.engine.spec.io if t.is_input)

    @property
    def all_binding_shapes_specified(self) -> bool:
        return self._inputs_set()

    def infer_shapes(self) -> list[str]:
        return [t.name for t in self.engine.spec.io if t.is_input and t.name not in self._shapes]

    def get_tensor_shape(self, name: str) -> Dims:
        io = self.engine._t(name)
        if io.is_input:
            return Dims(self._shapes.get(name, io.shape))
        if not self._inputs_set():
            return Dims(io.shape)  # unresolved dims stay -1 until every input shape is set
        return Dims(self.engine.spec.output_shapes(dict(self._shapes))[name])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if not self._not_captured("set_tensor_address"):
            return False
        ok = name in self.engine._io
        if not self._check("trt.address", ok, f"{name!r} is not an I/O tensor of this engine"):
            return False
        ptr = int(memory)
        if not self._check("trt.address", ptr != 0 and ptr % self._trt.address_alignment == 0,
                           f"address 0x{ptr:x} of {name!r} is null or not {self._trt.address_alignment}-byte aligned"):
            return False
        self._addr[name] = ptr
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addr.get(name, 0)

    def set_device_memory(self, memory: int, size: int) -> None:
        ok = self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        self._check("trt.device_memory", ok, "set_device_memory on a context that manages its own memory")
        self._check("trt.device_memory", int(memory) % 256 == 0 and int(size) >= self.engine.spec.device_memory_size,
                    f"device memory 0x{int(memory):x} ({int(size)} B) is not 256-byte aligned or smaller than "
                    f"device_memory_size_v2 = {self.engine.spec.device_memory_size}")
        self._mem = (int(memory), int(size))

    @property
    def device_memory(self) -> int:
        return self._mem[0] if self._mem else 0

    @device_memory.setter
    def device_memory(self, memory: int) -> None:
        self.set_device_memory(memory, self.engine.spec.device_memory_size)

    def is_stream_capturable(self, stream: int) -> bool:
        return self._trt.capturable(self.engine.spec)

    # ------------------------------------------------------------------ execution
    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = self._trt.cuda
        stream = cuda._streams.get(int(stream_handle))
        capturing = stream is not None and stream.capture is not None
        if not capturing and not self._not_captured("execute_async_v3 outside the graph"):
            return False
        spec = self.engine.spec
        missing_shape = [t.name for t in spec.io if t.is_input and t.name not in self._shapes]
        missing_addr = [t.name for t in spec.io if t.name not in self._addr]
        if not self._check("trt.enqueue_ready", not missing_shape and not missing_addr,
                           f"execute_async_v3 with input shapes unset for {missing_shape} and addresses unset for "
                           f"{missing_addr}"):
            return False
        if not self._check("trt.device_memory", self._mem is not None,
                           "a USER_MANAGED context enqueued without set_device_memory"):
            return False
        shapes = dict(self._shapes)
        shapes.update(spec.output_shapes(dict(self._shapes)))
        addrs = dict(self._addr)
        nbytes = {t.name: int(np.prod(shapes[t.name], dtype=np.int64)) * t.dtype.itemsize for t in spec.io}
        for t in spec.io:  # every buffer must be live and large enough for this enqueue's shape
            a, status = cuda._find(addrs[t.name], nbytes[t.name])
            if not self._check("trt.enqueue_ready", status == "ok",
                               f"buffer of {t.name!r} at 0x{addrs[t.name]:x} ({nbytes[t.name]} B for shape "
                               f"{shapes[t.name]}) is {'not a live device allocation' if a is None else status}"):
                return False
        outs = [t for t in spec.io if not t.is_input]
        for t in outs:
            p, n = addrs[t.name], nbytes[t.name]
            for u in spec.io:
                if u.name == t.name or (not u.is_input and u.name < t.name):
                    continue
                q, m = addrs[u.name], nbytes[u.name]
                if not self._check("trt.io_alias", not (n and m and p < q + m and q < p + n),
                                   f"output {t.name!r} overlaps {'input' if u.is_input else 'output'} {u.name!r}"):
                    return False
        if capturing:
            warm = self._warm_shapes == dict(self._shapes)
            if not self._check("trt.capture_warmup", warm,
                               "first enqueue for these input shapes happens inside a stream capture; run "
                               "execute_async_v3 once outside the capture first"):
                return False
            if not self._check("trt.capturable", self._trt.capturable(spec),
                               "this TensorRT-RTX engine is not stream capturable (build it with "
                               "BuilderFlag.REQUIRE_USER_ALLOCATION; check is_stream_capturable)"):
                return False
        elif int(stream_handle) == 0:
            self._trt.logger_log(Severity.WARNING, "Using default stream in enqueueV3() may lead to performance issues")
        mem = self._mem
        assert mem is not None
        reads = [(addrs[t.name], nbytes[t.name]) for t in spec.io if t.is_input] + [mem]
        writes = [(addrs[t.name], nbytes[t.name]) for t in outs] + [mem]
        trt = self._trt
        in_specs = [t for t in spec.io if t.is_input]

        def kernel() -> None:
            feeds = {t.name: cuda.read_device(addrs[t.name], nbytes[t.name], f"{spec.name} input {t.name}")
                     .view(t.dtype).reshape(shapes[t.name]).copy() for t in in_specs}
            cuda.read_device(mem[0], mem[1], f"{spec.name} scratch")[:] = 0xA5  # clobbers any concurrent user
            result = spec.execute(feeds)
            for t in outs:
                arr = np.ascontiguousarray(result[t.name], dtype=t.dtype)
                if tuple(arr.shape) != tuple(shapes[t.name]):
                    raise SimulatorError("trt.enqueue_ready", f"{spec.name}: {t.name} came out {arr.shape}, "
                                         f"TensorRT promised {shapes[t.name]}")
                cuda.read_device(addrs[t.name], nbytes[t.name], f"{spec.name} output {t.name}")[:] = \
                    np.frombuffer(arr.tobytes(), np.uint8)
            trt.kernels_run += 1

        cuda.launch(stream_handle, f"TensorRT {spec.name} enqueue", reads, writes, kernel, tag=self)
        if not capturing:
            self._warm_shapes = dict(self._shapes)
        self.enqueues += 1
        return True


class Runtime:
    def __init__(self, trt: "SimTensorRT", logger: Logger) -> None:
        self._trt, self.logger = trt, logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        trt = self._trt
        data = bytes(serialized_engine)
        spec = trt.registry.get(hashlib.sha256(data).hexdigest())
        trt.checks["trt.plan"] += 1
        if spec is None:
            self.logger.log(Severity.ERROR, "sim TensorRT: unknown plan (not built while the simulator recorded builds)")
            return None
        _, cc = trt.gpu()
        if spec.flavour != trt.__name__ or spec.version.split(".")[:3] != trt.__version__.split(".")[:3]:
            self.logger.log(Severity.ERROR, f"The engine plan file is not compatible with this version of TensorRT "
                            f"(built with {spec.flavour} {spec.version}, this is {trt.__name__} {trt.__version__})")
            return None
        if spec.compute_capability != cc:
            self.logger.log(Severity.ERROR, f"The engine plan file is generated for compute capability "
                            f"{spec.compute_capability}, this GPU is {cc}")
            return None
        return ICudaEngine(trt, spec)


class SimTensorRT:
    """The ``tensorrt`` / ``tensorrt_rtx`` module stand-in, bound to one :class:`Simulator`."""

    Logger = Logger
    DataType = DataType
    TensorIOMode = TensorIOMode
    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    Dims = Dims
    nptype = staticmethod(nptype)

    def __init__(self, cuda: Simulator, flavour: str = "tensorrt", version: str = "10.13.0.35",
                 registry: dict[str, EngineSpec] | None = None, address_alignment: int = 256) -> None:
        self.__name__ = flavour
        self.__version__ = version
        self.cuda = cuda
        self.registry: dict[str, EngineSpec] = registry if registry is not None else {}
        self.address_alignment = address_alignment
        self.checks = cuda.checks  # one counter for CUDA and TensorRT rules
        self.kernels_run = 0
        self.contexts: weakref.WeakSet[IExecutionContext] = weakref.WeakSet()
        self.log: list[tuple[Severity, str]] = []

    def Runtime(self, logger: Logger) -> Runtime:  # noqa: N802 (the module's class name)
        return Runtime(self, logger)

    def gpu(self) -> tuple[str, str]:
        p = self.cuda.prop
        return p.name.rstrip(b"\x00").decode(), f"{p.major}.{p.minor}"

    def capturable(self, spec: EngineSpec) -> bool:
        return spec.flavour != "tensorrt_rtx" or "REQUIRE_USER_ALLOCATION" in spec.build_flags

    def logger_log(self, severity: Severity, msg: str) -> None:
        self.log.append((severity, msg))

    def cuda_live_tags(self) -> list[Any]:
        return self.cuda.live_exec_tags()

    def make_plan(self, name: str, io: Sequence[IOSpec],
                  execute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                  output_shapes: Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]],
                  profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
                  build_flags: Sequence[str] = ("REQUIRE_USER_ALLOCATION",)) -> bytes:
        """A synthetic plan for a Python-function engine (bring-up stand-ins, rule tests)."""
        _, cc = self.gpu()
        spec = EngineSpec(name, tuple(io), {k: tuple(tuple(int(d) for d in s) for s in v)  # type: ignore[misc]
                                            for k, v in (profile or {}).items()},
                          self.__name__, self.__version__, cc, execute, output_shapes, frozenset(build_flags))
        plan = b"SIMPLAN\x00" + json.dumps({"name": name, "n": len(self.registry)}).encode()
        self.registry[hashlib.sha256(plan).hexdigest()] = spec
        return plan
