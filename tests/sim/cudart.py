"""A strict simulator of the CUDA runtime as cuda-python exposes it (``cuda.bindings.runtime``).

Only what the TensorRT backend and the GPU bring-up call is simulated, with cuda-python's
conventions: every function returns a tuple whose first element is a ``cudaError_t``
(``(err,)`` or ``(err, value)``); handles are small objects that ``int()`` turns into the
raw handle; device pointers are plain ints.

The point is to run GPU code paths on a CPU and catch the mistakes a GPU would punish
silently or late. The rules (ids in ``RULES``) come from the CUDA Runtime API reference
(stream capture, API synchronization behaviour, cudaFree) and are enforced:

* device memory is real (numpy bytes behind fake addresses); every access is bounds- and
  liveness-checked, fresh allocations hold NaN-pattern garbage (0xFF bytes);
* stream work is *deferred*: it runs when the host synchronises (stream, event, device,
  cudaFree's implicit device sync, or a copy to pageable host memory, which CUDA performs
  synchronously); so a result read too early holds garbage, as on a GPU;
* work on one stream that touches memory another stream wrote, without an event wait, is
  a race (``stream.race``);
* inside a stream capture nothing runs: operations are recorded into a graph; synchronous
  and "potentially unsafe" calls (malloc/free, syncs, queries, sync copies) are errors
  and invalidate the capture, as CUDA does; pageable host memory cannot be captured;
* a launched graph exec replays exactly the recorded operations with the recorded
  pointers and kernel arguments: host-side changes made after the capture are not seen;
* everything allocated must be freed (``assert_clean``).

A violation raises :class:`SimulatorError` naming the rule (``strict=True``, the default),
or, with ``strict=False``, returns the error code CUDA documents (and records the
violation) so that the caller's own error handling runs.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

# Rule id -> what it enforces. Counted each time it is checked (Simulator.checks).
RULES: dict[str, str] = {
    "device.bounds": "a device access lies inside one live allocation",
    "device.use_after_free": "no access to freed device memory (also by a replayed graph)",
    "device.double_free": "cudaFree/cudaFreeHost of a pointer that is not a live allocation is an error",
    "device.free_pending": "no cudaFree of memory that queued stream work still uses (cudaFree need not synchronise)",
    "memcpy.kind": "the memcpy kind matches where source and destination live",
    "stream.valid": "the stream handle is a live stream",
    "stream.race": "an operation does not touch memory that another stream wrote (or reads) without an event wait",
    "capture.unsafe_call": "no cudaMalloc/cudaFree/cudaMallocHost/cudaFreeHost during a capture (global or thread-local mode)",
    "capture.sync": "no synchronisation or query of a capturing stream, and no device synchronisation during a capture",
    "capture.sync_copy": "no synchronous cudaMemcpy during a capture",
    "capture.pageable_memcpy": "a captured memcpy does not use pageable host memory",
    "capture.state": "begin/end capture pair up on the same stream (and thread)",
    "graph.replay_exact": "a graph exec replays the recorded operations with the recorded pointers",
    "graph.valid": "graphs and graph execs are live when used",
    "host.read_after_sync": "host memory written by an async device-to-host copy is read (by the host or by another copy) "
                            "only after the stream is synchronised; before that it holds garbage",
    "leak.free_all": "every allocation, stream, event, graph and graph exec is released",
}


class SimulatorError(RuntimeError):
    """A rule of the CUDA (or TensorRT) programming model was broken."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"[sim rule {rule}] {message}")
        self.rule = rule


class SimulatorUnsupported(RuntimeError):
    """The simulator does not model this call or argument (not a user error)."""


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorNotPermitted = 800
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureUnmatched = 903
    cudaErrorStreamCaptureWrongThread = 908


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaStreamCaptureStatus(enum.IntEnum):
    cudaStreamCaptureStatusNone = 0
    cudaStreamCaptureStatusActive = 1
    cudaStreamCaptureStatusInvalidated = 2


_ERROR_TEXT = {
    cudaError_t.cudaSuccess: "no error",
    cudaError_t.cudaErrorInvalidValue: "invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: "out of memory",
    cudaError_t.cudaErrorInvalidDevicePointer: "invalid device pointer",
    cudaError_t.cudaErrorInvalidMemcpyDirection: "invalid copy direction for memcpy",
    cudaError_t.cudaErrorInvalidResourceHandle: "invalid resource handle",
    cudaError_t.cudaErrorIllegalState: "the operation cannot be performed in the present state",
    cudaError_t.cudaErrorNotReady: "device not ready",
    cudaError_t.cudaErrorIllegalAddress: "an illegal memory access was encountered",
    cudaError_t.cudaErrorNotPermitted: "operation not permitted",
    cudaError_t.cudaErrorStreamCaptureUnsupported: "operation not permitted when stream is capturing",
    cudaError_t.cudaErrorStreamCaptureInvalidated: "operation failed due to a previous error during capture",
    cudaError_t.cudaErrorStreamCaptureUnmatched: "capture was not initiated in this stream",
    cudaError_t.cudaErrorStreamCaptureWrongThread: "attempt to terminate a thread-local capture sequence from another thread",
}


class _Handle:
    """cuda-python's opaque handle types: ``int(h)`` is the raw value."""

    def __init__(self, value: int = 0) -> None:
        self._v = int(value)

    def __int__(self) -> int:
        return self._v

    def __index__(self) -> int:
        return self._v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (_Handle, int)) and int(other) == self._v  # type: ignore[arg-type]

    def __hash__(self) -> int:
        return hash(self._v)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 0x{self._v:x}>"


class cudaStream_t(_Handle):
    pass


class cudaEvent_t(_Handle):
    pass


class cudaGraph_t(_Handle):
    pass


class cudaGraphExec_t(_Handle):
    pass


@dataclass
class cudaDeviceProp:
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int
    multiProcessorCount: int = 132


# --------------------------------------------------------------------------- internals


@dataclass
class _Alloc:
    base: int
    size: int
    buf: np.ndarray  # uint8
    kind: str  # "device" | "pinned"
    freed: bool = False


@dataclass
class _Op:
    """One unit of stream work: device ranges it reads/writes and what it does when run."""

    desc: str
    reads: list[tuple[int, int]]
    writes: list[tuple[int, int]]
    run: Callable[[], None]
    seq: int = 0
    stream: "_Stream | None" = None
    tag: Any = None  # weakref to whoever enqueued it (a TensorRT context), or None


@dataclass
class _Capture:
    mode: cudaStreamCaptureMode
    thread: int
    ops: list[_Op] = field(default_factory=list)
    invalid: str | None = None


@dataclass
class _Stream:
    handle: int
    queue: list[_Op] = field(default_factory=list)
    capture: _Capture | None = None
    ordered: dict[int, int] = field(default_factory=dict)  # other stream handle -> last seq waited for
    destroyed: bool = False


@dataclass
class _Event:
    handle: int
    stream: int | None = None
    seq: int = 0
    time: float = 0.0
    destroyed: bool = False


@dataclass
class _Graph:
    handle: int
    ops: list[_Op]
    destroyed: bool = False


@dataclass
class _Exec:
    handle: int
    ops: list[_Op]
    destroyed: bool = False
    launches: int = 0


_OK = cudaError_t.cudaSuccess
DEVICE_BASE = 0x7F00_0000_0000
POISON = 0xFF  # float32 0xFFFFFFFF is a NaN: garbage that check_finite and comparisons notice


class Simulator:
    """One simulated GPU and its CUDA runtime; attribute access mirrors ``cuda.bindings.runtime``."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamCaptureStatus = cudaStreamCaptureStatus
    cudaStream_t = cudaStream_t
    cudaEvent_t = cudaEvent_t
    cudaGraph_t = cudaGraph_t
    cudaGraphExec_t = cudaGraphExec_t
    cudaDeviceProp = cudaDeviceProp

    def __init__(self, gpu_name: str = "NVIDIA GeForce RTX 4090", compute_capability: str = "8.9",
                 memory_bytes: int = 24 << 30, strict: bool = True) -> None:
        major, minor = (int(v) for v in compute_capability.split("."))
        self.prop = cudaDeviceProp(gpu_name.encode() + b"\x00" * (256 - len(gpu_name)), major, minor, memory_bytes)
        self.strict = strict
        self.memory_bytes = memory_bytes
        self.checks: Counter[str] = Counter()
        self.violations: list[SimulatorError] = []
        self.calls: Counter[str] = Counter()
        self.last_detail = ""
        self._lock = threading.RLock()
        self._allocs: dict[int, _Alloc] = {}
        self._next_dev = DEVICE_BASE
        self._streams: dict[int, _Stream] = {0: _Stream(0)}  # 0: the legacy default stream
        self._events: dict[int, _Event] = {}
        self._graphs: dict[int, _Graph] = {}
        self._execs: dict[int, _Exec] = {}
        self._ids = itertools.count(0x1000, 0x10)
        self._seq = itertools.count(1)
        self._clock = 0.0
        self.executed_ops = 0
        self.replayed_ops = 0
        self.pending_host: dict[int, int] = {}  # host address -> bytes an unsynchronised D2H copy will write

    # ------------------------------------------------------------------ rule plumbing
    def _check(self, rule: str, ok: bool, message: str | Callable[[], str],
               code: cudaError_t = cudaError_t.cudaErrorInvalidValue) -> cudaError_t | None:
        """Count one evaluation of ``rule``; on failure raise (strict) or return ``code``."""
        self.checks[rule] += 1
        if ok:
            return None
        text = message() if callable(message) else message
        err = SimulatorError(rule, text)
        self.violations.append(err)
        self.last_detail = str(err)
        if self.strict:
            raise err
        return code

    def _capturing(self) -> list[_Stream]:
        return [s for s in self._streams.values() if s.capture is not None and not s.destroyed]

    def _unsafe_during_capture(self, what: str) -> cudaError_t | None:
        """CUDA: in global mode any thread, in thread-local mode the capturing thread, may not
        call "potentially unsafe" APIs while a capture is active; relaxed mode allows them."""
        me = threading.get_ident()
        offending = [s for s in self._capturing()
                     if s.capture is not None and (
                         s.capture.mode == cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
                         or (s.capture.mode == cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
                             and s.capture.thread == me))]
        err = self._check("capture.unsafe_call", not offending,
                          lambda: f"{what} while stream 0x{offending[0].handle:x} is capturing "
                          f"({offending[0].capture.mode.name})",  # type: ignore[union-attr]
                          cudaError_t.cudaErrorStreamCaptureUnsupported)
        for s in offending:
            assert s.capture is not None
            s.capture.invalid = s.capture.invalid or what
        return err

    # ------------------------------------------------------------------ memory model
    def _find(self, ptr: int, nbytes: int, kinds: Iterable[str] = ("device",)) -> tuple[_Alloc | None, str]:
        for a in self._allocs.values():
            if a.kind in kinds and a.base <= ptr < a.base + max(a.size, 1):
                if a.freed:
                    return a, "freed"
                if ptr + nbytes > a.base + a.size:
                    return a, "bounds"
                return a, "ok"
        return None, "none"

    def _device_view(self, ptr: int, nbytes: int, what: str) -> np.ndarray:
        a, status = self._find(int(ptr), int(nbytes))
        if status == "freed":
            self._check("device.use_after_free", False, f"{what}: 0x{ptr:x} (+{nbytes} B) is in freed memory",
                        cudaError_t.cudaErrorIllegalAddress)
        else:
            self.checks["device.use_after_free"] += 1
        self._check("device.bounds", status == "ok",
                    lambda: f"{what}: 0x{ptr:x} (+{nbytes} B) is outside every live allocation"
                    + (f" (allocation 0x{a.base:x} holds {a.size} B)" if a is not None else ""),
                    cudaError_t.cudaErrorIllegalAddress)
        if status != "ok":  # non-strict: nothing sensible to return; treat as a sticky fault
            raise SimulatorError("device.bounds", f"{what}: illegal address 0x{ptr:x}")
        assert a is not None
        off = int(ptr) - a.base
        return a.buf[off:off + int(nbytes)]

    def _is_device(self, ptr: int) -> bool:
        return DEVICE_BASE <= int(ptr) < self._next_dev + (1 << 30)

    def _pinned(self, ptr: int, nbytes: int) -> np.ndarray | None:
        a, status = self._find(int(ptr), int(nbytes), kinds=("pinned",))
        if a is None:
            return None
        if status != "ok":
            self._check("device.bounds", False, f"pinned host 0x{ptr:x} (+{nbytes} B) is {status}")
        off = int(ptr) - a.base
        return a.buf[off:off + int(nbytes)]

    def pending_in(self, ptr: int, n: int) -> list[int]:
        """Host addresses in [ptr, ptr+n) that an unsynchronised device-to-host copy will write."""
        return [p for p, k in self.pending_host.items() if p < ptr + n and ptr < p + k]

    def explain_host(self, array: np.ndarray) -> str | None:
        """Why ``array`` may hold garbage: the rule it breaks if read now, else None."""
        if self.pending_in(int(array.ctypes.data), int(array.nbytes)):
            return (f"[sim rule host.read_after_sync] {RULES['host.read_after_sync']}: this array is the "
                    "destination of a device-to-host copy whose stream was not synchronised")
        return None

    @staticmethod
    def _host_ptr(obj: Any) -> int:
        if isinstance(obj, np.ndarray):
            return int(obj.ctypes.data)
        return int(obj)

    # ------------------------------------------------------------------ streams and ops
    def _stream(self, stream: Any) -> _Stream | None:
        h = int(stream) if stream is not None else 0
        s = self._streams.get(h)
        if self._check("stream.valid", s is not None and not s.destroyed, f"stream 0x{h:x} is not a live stream",
                       cudaError_t.cudaErrorInvalidResourceHandle) is not None:
            return None
        return s

    def _enqueue(self, s: _Stream, op: _Op) -> None:
        op.stream = s
        if s.capture is not None:
            if s.capture.invalid is None:
                s.capture.ops.append(op)
            return
        op.seq = next(self._seq)
        self._race_check(s, op)
        s.queue.append(op)

    def _race_check(self, s: _Stream, op: _Op) -> None:
        for other in self._streams.values():
            if other is s or other.destroyed:
                continue
            seen = s.ordered.get(other.handle, 0)
            for p in other.queue:
                if p.seq <= seen:
                    continue
                conflict = _overlap(op.reads + op.writes, p.writes) or _overlap(op.writes, p.reads)
                self._check("stream.race", conflict is None,
                            lambda p=p, conflict=conflict: f"{op.desc} on stream 0x{s.handle:x} touches 0x{conflict:x}, which "
                            f"{p.desc} (pending on stream 0x{other.handle:x}) uses; wait for an event recorded after it",
                            cudaError_t.cudaErrorIllegalState)
        self.checks["stream.race"] += 1

    def _run(self, op: _Op) -> None:
        op.run()
        self.executed_ops += 1

    def _drain(self, s: _Stream, upto: int | None = None) -> None:
        while s.queue and (upto is None or s.queue[0].seq <= upto):
            self._run(s.queue.pop(0))

    def _drain_all(self) -> None:
        for s in list(self._streams.values()):
            self._drain(s)

    def pending(self) -> int:
        return sum(len(s.queue) for s in self._streams.values())

    # ================================================================== the API
    def cudaGetErrorString(self, error: Any) -> tuple[cudaError_t, bytes]:
        e = cudaError_t(int(error))
        text = _ERROR_TEXT.get(e, "unknown error")
        if e != _OK and self.last_detail:
            text += f" ({self.last_detail})"
        return _OK, text.encode()

    def cudaGetErrorName(self, error: Any) -> tuple[cudaError_t, bytes]:
        return _OK, cudaError_t(int(error)).name.encode()

    def cudaGetDevice(self) -> tuple[cudaError_t, int]:
        self.calls["cudaGetDevice"] += 1
        return _OK, 0

    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:
        return (_OK if int(device) == 0 else cudaError_t.cudaErrorInvalidValue,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[cudaError_t, cudaDeviceProp | None]:
        self.calls["cudaGetDeviceProperties"] += 1
        if int(device) != 0:
            return cudaError_t.cudaErrorInvalidValue, None
        return _OK, self.prop

    def cudaMemGetInfo(self) -> tuple[cudaError_t, int, int]:
        used = sum(a.size for a in self._allocs.values() if a.kind == "device" and not a.freed)
        return _OK, self.memory_bytes - used, self.memory_bytes

    # ------------------------------------------------------------------ allocation
    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int]:
        with self._lock:
            self.calls["cudaMalloc"] += 1
            err = self._unsafe_during_capture("cudaMalloc")
            if err is not None:
                return err, 0
            size = int(size)
            used = sum(a.size for a in self._allocs.values() if a.kind == "device" and not a.freed)
            if size < 0 or used + size > self.memory_bytes:
                return cudaError_t.cudaErrorMemoryAllocation, 0
            base = self._next_dev
            # 512-byte aligned like cudaMalloc, with an unmapped guard gap after each allocation
            self._next_dev += -(-max(size, 1) // 512) * 512 + 64 * 1024
            self._allocs[base] = _Alloc(base, size, np.full(size, POISON, np.uint8), "device")
            return _OK, base

    def cudaFree(self, devPtr: int) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaFree"] += 1
            err = self._unsafe_during_capture("cudaFree")
            if err is not None:
                return (err,)
            ptr = int(devPtr)
            if ptr == 0:
                return (_OK,)
            a = self._allocs.get(ptr)
            err = self._check("device.double_free", a is not None and a.kind == "device" and not a.freed,
                              f"cudaFree(0x{ptr:x}): not the base of a live device allocation",
                              cudaError_t.cudaErrorInvalidDevicePointer)
            if err is not None:
                return (err,)
            assert a is not None
            # cudaFree "may perform implicit synchronization": the simulator takes the case
            # where it does not, so memory that queued work still uses must not be freed.
            users = [op.desc for st in self._streams.values() for op in st.queue
                     if _overlap(op.reads + op.writes, [(a.base, max(a.size, 1))]) is not None]
            err = self._check("device.free_pending", not users,
                              lambda: f"cudaFree(0x{ptr:x}) while queued work still uses it ({users[0]}); "
                              "synchronise the stream first", cudaError_t.cudaErrorIllegalState)
            if err is not None:
                return (err,)
            a.freed = True
            a.buf = np.empty(0, np.uint8)
            return (_OK,)

    def cudaMallocHost(self, size: int) -> tuple[cudaError_t, int]:
        with self._lock:
            self.calls["cudaMallocHost"] += 1
            err = self._unsafe_during_capture("cudaMallocHost")
            if err is not None:
                return err, 0
            buf = np.full(max(int(size), 1), POISON, np.uint8)  # real host memory: numpy can view it
            base = int(buf.ctypes.data)
            self._allocs[base] = _Alloc(base, int(size), buf, "pinned")
            return _OK, base

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaFreeHost"] += 1
            err = self._unsafe_during_capture("cudaFreeHost")
            if err is not None:
                return (err,)
            a = self._allocs.get(int(ptr))
            err = self._check("device.double_free", a is not None and a.kind == "pinned" and not a.freed,
                              f"cudaFreeHost(0x{int(ptr):x}): not a live pinned allocation")
            if err is not None:
                return (err,)
            self._drain_all()
            assert a is not None
            a.freed = True
            return (_OK,)

    def host_array(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A numpy view of pinned memory (what ``np.ctypeslib`` would give on a real machine);
        refuses a view while a device copy into it is still pending (host.read_after_sync)."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        view = self._pinned(ptr, n)
        if view is None:
            raise SimulatorUnsupported(f"0x{ptr:x} is not simulator-pinned memory")
        pend = self.pending_in(ptr, n)
        self._check("host.read_after_sync", not pend,
                    f"host reads pinned 0x{ptr:x} while a device-to-host copy into it is pending; "
                    "synchronise the stream first")
        return view.view(dtype).reshape(shape)

    # ------------------------------------------------------------------ copies
    def cudaMemcpyAsync(self, dst: Any, src: Any, count: int, kind: Any, stream: Any = None) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaMemcpyAsync"] += 1
            s = self._stream(stream)
            if s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            if not isinstance(kind, cudaMemcpyKind):  # cuda-python: "kind not None : cudaMemcpyKind"
                raise TypeError(f"Argument 'kind' has incorrect type (expected cudaMemcpyKind, got {type(kind).__name__})")
            return (self._memcpy(self._host_ptr(dst), self._host_ptr(src), int(count), kind, s),)

    def cudaMemcpy(self, dst: Any, src: Any, count: int, kind: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaMemcpy"] += 1
            capturing = self._capturing()
            err = self._check("capture.sync_copy", not capturing, "synchronous cudaMemcpy during a stream capture",
                              cudaError_t.cudaErrorStreamCaptureUnsupported)
            if err is not None:
                for c in capturing:
                    assert c.capture is not None
                    c.capture.invalid = c.capture.invalid or "cudaMemcpy"
                return (err,)
            s = self._streams[0]
            self._drain_all()  # the legacy stream synchronises with the others
            err = self._memcpy(self._host_ptr(dst), self._host_ptr(src), int(count), cudaMemcpyKind(int(kind)), s)
            self._drain_all()
            return (err,)

    def _memcpy(self, dst: int, src: int, n: int, kind: cudaMemcpyKind, s: _Stream) -> cudaError_t:
        d_dev, s_dev = self._is_device(dst), self._is_device(src)
        want = {cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False), cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True),
                cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True), cudaMemcpyKind.cudaMemcpyHostToHost: (False, False)}
        if kind != cudaMemcpyKind.cudaMemcpyDefault:
            err = self._check("memcpy.kind", want[kind] == (d_dev, s_dev),
                              f"{kind.name} but dst 0x{dst:x} is {'device' if d_dev else 'host'} and src 0x{src:x} is "
                              f"{'device' if s_dev else 'host'}", cudaError_t.cudaErrorInvalidMemcpyDirection)
            if err is not None:
                return err
        if n == 0:
            return _OK
        # validate device ranges now (an illegal pointer is reported at the call in the simulator)
        if d_dev:
            self._device_view(dst, n, "memcpy destination")
        if s_dev:
            self._device_view(src, n, "memcpy source")
        dst_pinned = None if d_dev else self._pinned(dst, n)
        src_pinned = None if s_dev else self._pinned(src, n)
        capturing = s.capture is not None
        if capturing:
            pageable = (not d_dev and dst_pinned is None) or (not s_dev and src_pinned is None)
            err = self._check("capture.pageable_memcpy", not pageable,
                              "cudaMemcpyAsync with pageable host memory inside a stream capture; use cudaMallocHost buffers",
                              cudaError_t.cudaErrorStreamCaptureUnsupported)
            if err is not None:
                assert s.capture is not None
                s.capture.invalid = s.capture.invalid or "pageable memcpy"
                return err
        if not s_dev:
            pend = self.pending_in(src, n)
            self._check("host.read_after_sync", not pend,
                        lambda: f"host-to-device copy reads host 0x{src:x}, which a device-to-host copy that has not "
                        "been synchronised is still to write; synchronise that stream first")
        reads = [(src, n)] if s_dev else []
        writes = [(dst, n)] if d_dev else []
        if not s_dev and src_pinned is None:
            data = ctypes.string_at(src, n)  # pageable source: staged before the call returns

            def read_src() -> bytes:
                return data
        elif not s_dev:
            def read_src() -> bytes:
                return self._pinned(src, n).tobytes()  # type: ignore[union-attr]  # pinned: read when the copy runs
        else:
            def read_src() -> bytes:
                return self._device_view(src, n, "memcpy source").tobytes()

        def write_dst(data: bytes) -> None:
            if d_dev:
                self._device_view(dst, n, "memcpy destination")[:] = np.frombuffer(data, np.uint8)
            elif dst_pinned is not None:
                self._pinned(dst, n)[:] = np.frombuffer(data, np.uint8)  # type: ignore[index]
            else:
                ctypes.memmove(dst, data, n)
            self.pending_host.pop(dst, None)

        op = _Op(f"memcpy {kind.name} {n} B", reads, writes, lambda: write_dst(read_src()))
        self._enqueue(s, op)
        if not capturing and not d_dev:
            # An async copy to host memory may complete any time before the stream is
            # synchronised (CUDA: for pageable memory it "might be synchronous"; the
            # simulator takes the asynchronous case): until then the buffer holds garbage.
            ctypes.memset(dst, POISON, n)
            self.pending_host[dst] = n
        return _OK

    def cudaMemsetAsync(self, devPtr: int, value: int, count: int, stream: Any = None) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaMemsetAsync"] += 1
            s = self._stream(stream)
            if s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            ptr, n, v = int(devPtr), int(count), int(value) & 0xFF
            self._device_view(ptr, n, "memset")

            def run() -> None:
                self._device_view(ptr, n, "memset")[:] = v

            self._enqueue(s, _Op(f"memset {n} B", [], [(ptr, n)], run))
            return (_OK,)

    # ------------------------------------------------------------------ streams
    def cudaStreamCreate(self) -> tuple[cudaError_t, cudaStream_t]:
        with self._lock:
            self.calls["cudaStreamCreate"] += 1
            h = next(self._ids)
            self._streams[h] = _Stream(h)
            return _OK, cudaStream_t(h)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaStream_t]:
        return self.cudaStreamCreate()

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaStreamDestroy"] += 1
            s = self._stream(stream)
            if s is None or s.handle == 0:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            err = self._check("capture.state", s.capture is None, f"stream 0x{s.handle:x} destroyed while capturing",
                              cudaError_t.cudaErrorStreamCaptureUnmatched)
            if err is not None:
                return (err,)
            # CUDA lets pending work finish after cudaStreamDestroy; the simulator runs it now
            self._drain(s)
            s.destroyed = True
            return (_OK,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaStreamSynchronize"] += 1
            s = self._stream(stream)
            if s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            err = self._check("capture.sync", s.capture is None,
                              f"cudaStreamSynchronize on stream 0x{s.handle:x} while it is capturing",
                              cudaError_t.cudaErrorStreamCaptureUnsupported)
            if err is not None:
                assert s.capture is not None
                s.capture.invalid = s.capture.invalid or "cudaStreamSynchronize"
                return (err,)
            if s.handle == 0:
                self._drain_all()
            self._drain(s)
            return (_OK,)

    def cudaStreamQuery(self, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            s = self._stream(stream)
            if s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            err = self._check("capture.sync", s.capture is None, "cudaStreamQuery on a capturing stream",
                              cudaError_t.cudaErrorStreamCaptureUnsupported)
            if err is not None:
                assert s.capture is not None
                s.capture.invalid = s.capture.invalid or "cudaStreamQuery"
                return (err,)
            return (_OK if not s.queue else cudaError_t.cudaErrorNotReady,)

    def cudaDeviceSynchronize(self) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaDeviceSynchronize"] += 1
            capturing = self._capturing()
            err = self._check("capture.sync", not capturing, "cudaDeviceSynchronize during a stream capture",
                              cudaError_t.cudaErrorStreamCaptureUnsupported)
            if err is not None:
                for c in capturing:
                    assert c.capture is not None
                    c.capture.invalid = c.capture.invalid or "cudaDeviceSynchronize"
                return (err,)
            self._drain_all()
            return (_OK,)

    # ------------------------------------------------------------------ events
    def cudaEventCreate(self) -> tuple[cudaError_t, cudaEvent_t]:
        with self._lock:
            self.calls["cudaEventCreate"] += 1
            h = next(self._ids)
            self._events[h] = _Event(h)
            return _OK, cudaEvent_t(h)

    def cudaEventCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaEvent_t]:
        return self.cudaEventCreate()

    def _event(self, event: Any) -> _Event | None:
        e = self._events.get(int(event))
        if self._check("graph.valid", e is not None and not e.destroyed, f"event 0x{int(event):x} is not live",
                       cudaError_t.cudaErrorInvalidResourceHandle) is not None:
            return None
        return e

    def cudaEventRecord(self, event: Any, stream: Any = None) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaEventRecord"] += 1
            e, s = self._event(event), self._stream(stream)
            if e is None or s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            if s.capture is not None:
                raise SimulatorUnsupported("events inside a stream capture are not simulated")

            def stamp(e: _Event = e) -> None:
                self._clock += 1e-3
                e.time = self._clock

            op = _Op("event record", [], [], stamp)
            self._enqueue(s, op)
            e.stream, e.seq = s.handle, op.seq
            return (_OK,)

    def cudaStreamWaitEvent(self, stream: Any, event: Any, flags: int) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaStreamWaitEvent"] += 1
            e, s = self._event(event), self._stream(stream)
            if e is None or s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            if s.capture is not None:
                raise SimulatorUnsupported("events inside a stream capture are not simulated")
            if e.stream is None:
                return (_OK,)
            src = self._streams[e.stream]
            upto = e.seq

            def wait() -> None:
                self._drain(src, upto)

            self._enqueue(s, _Op("event wait", [], [], wait))
            s.ordered[src.handle] = max(s.ordered.get(src.handle, 0), upto)
            return (_OK,)

    def cudaEventSynchronize(self, event: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaEventSynchronize"] += 1
            e = self._event(event)
            if e is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            capturing = self._capturing()
            err = self._check("capture.sync", not capturing, "cudaEventSynchronize during a stream capture",
                              cudaError_t.cudaErrorStreamCaptureUnsupported)
            if err is not None:
                return (err,)
            if e.stream is not None:
                self._drain(self._streams[e.stream], e.seq)
            return (_OK,)

    def cudaEventElapsedTime(self, start: Any, end: Any) -> tuple[cudaError_t, float]:
        a, b = self._event(start), self._event(end)
        if a is None or b is None:
            return cudaError_t.cudaErrorInvalidResourceHandle, 0.0
        return _OK, float((b.time - a.time) * 1e3)

    def cudaEventDestroy(self, event: Any) -> tuple[cudaError_t]:
        e = self._event(event)
        if e is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        e.destroyed = True
        return (_OK,)

    # ------------------------------------------------------------------ capture and graphs
    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaStreamBeginCapture"] += 1
            s = self._stream(stream)
            if s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            err = self._check("capture.state", s.handle != 0 and s.capture is None,
                              "capture on the legacy default stream" if s.handle == 0 else "stream is already capturing",
                              cudaError_t.cudaErrorStreamCaptureUnsupported if s.handle == 0
                              else cudaError_t.cudaErrorIllegalState)
            if err is not None:
                return (err,)
            if not isinstance(mode, cudaStreamCaptureMode):
                raise TypeError(f"Argument 'mode' has incorrect type (expected cudaStreamCaptureMode, got {type(mode).__name__})")
            s.capture = _Capture(mode, threading.get_ident())
            return (_OK,)

    def cudaStreamIsCapturing(self, stream: Any) -> tuple[cudaError_t, cudaStreamCaptureStatus]:
        s = self._stream(stream)
        if s is None:
            return cudaError_t.cudaErrorInvalidResourceHandle, cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
        if s.capture is None:
            return _OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
        return _OK, (cudaStreamCaptureStatus.cudaStreamCaptureStatusInvalidated if s.capture.invalid
                     else cudaStreamCaptureStatus.cudaStreamCaptureStatusActive)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[cudaError_t, cudaGraph_t | None]:
        with self._lock:
            self.calls["cudaStreamEndCapture"] += 1
            s = self._stream(stream)
            if s is None:
                return cudaError_t.cudaErrorInvalidResourceHandle, None
            err = self._check("capture.state", s.capture is not None, f"stream 0x{s.handle:x} is not capturing",
                              cudaError_t.cudaErrorIllegalState)
            if err is not None:
                return err, None
            c = s.capture
            assert c is not None
            if c.mode != cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed:
                err = self._check("capture.state", c.thread == threading.get_ident(),
                                  "cudaStreamEndCapture from another thread than the one that began the capture",
                                  cudaError_t.cudaErrorStreamCaptureWrongThread)
                if err is not None:
                    return err, None
            s.capture = None
            if c.invalid is not None:
                self.last_detail = f"the capture was invalidated by {c.invalid}"
                return cudaError_t.cudaErrorStreamCaptureInvalidated, None
            h = next(self._ids)
            self._graphs[h] = _Graph(h, list(c.ops))
            return _OK, cudaGraph_t(h)

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[cudaError_t, cudaGraphExec_t | None]:
        with self._lock:
            self.calls["cudaGraphInstantiate"] += 1
            g = self._graphs.get(int(graph))
            err = self._check("graph.valid", g is not None and not g.destroyed, f"graph 0x{int(graph):x} is not live",
                              cudaError_t.cudaErrorInvalidResourceHandle)
            if err is not None:
                return err, None
            assert g is not None
            h = next(self._ids)
            self._execs[h] = _Exec(h, list(g.ops))  # an exec is independent of its graph once built
            return _OK, cudaGraphExec_t(h)

    def cudaGraphLaunch(self, graphExec: Any, stream: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaGraphLaunch"] += 1
            ex = self._execs.get(int(graphExec))
            err = self._check("graph.valid", ex is not None and not ex.destroyed,
                              f"graph exec 0x{int(graphExec):x} is not live", cudaError_t.cudaErrorInvalidResourceHandle)
            if err is not None:
                return (err,)
            s = self._stream(stream)
            if s is None:
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            assert ex is not None
            ex.launches += 1
            for rec in ex.ops:  # the recorded operations, pointers and arguments: nothing else
                self.checks["graph.replay_exact"] += 1
                self._enqueue(s, _Op(f"replay of {rec.desc}", rec.reads, rec.writes, self._counted(rec.run), tag=rec.tag))
            return (_OK,)

    def _counted(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            self.replayed_ops += 1
            fn()
        return run

    def cudaGraphExecDestroy(self, graphExec: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaGraphExecDestroy"] += 1
            ex = self._execs.get(int(graphExec))
            err = self._check("graph.valid", ex is not None and not ex.destroyed, "graph exec is not live",
                              cudaError_t.cudaErrorInvalidResourceHandle)
            if err is not None:
                return (err,)
            assert ex is not None
            ex.destroyed = True
            return (_OK,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[cudaError_t]:
        with self._lock:
            self.calls["cudaGraphDestroy"] += 1
            g = self._graphs.get(int(graph))
            err = self._check("graph.valid", g is not None and not g.destroyed, "graph is not live",
                              cudaError_t.cudaErrorInvalidResourceHandle)
            if err is not None:
                return (err,)
            assert g is not None
            g.destroyed = True
            return (_OK,)

    # ------------------------------------------------------------------ kernels (for the TensorRT simulator)
    def launch(self, stream: Any, desc: str, reads: list[tuple[int, int]], writes: list[tuple[int, int]],
               run: Callable[[], None], tag: Any = None) -> None:
        """Enqueue a device "kernel" (already bound to its pointers and arguments)."""
        with self._lock:
            s = self._stream(stream)
            if s is None:
                raise SimulatorError("stream.valid", f"kernel {desc} launched on a dead stream")
            for p, n in reads + writes:
                self._device_view(p, n, desc)  # bad pointers are reported at launch
            self._enqueue(s, _Op(desc, reads, writes, run, tag=weakref.ref(tag) if tag is not None else None))

    def live_exec_tags(self) -> list[Any]:
        """Objects (TensorRT contexts) whose enqueues a live graph exec replays."""
        out = []
        for ex in self._execs.values():
            if not ex.destroyed:
                out += [t() for t in (op.tag for op in ex.ops) if t is not None and t() is not None]
        return out

    def read_device(self, ptr: int, nbytes: int, what: str) -> np.ndarray:
        return self._device_view(ptr, nbytes, what)

    # ------------------------------------------------------------------ teardown
    def leaks(self) -> list[str]:
        out = [f"device allocation 0x{a.base:x} ({a.size} B)" for a in self._allocs.values()
               if a.kind == "device" and not a.freed]
        out += [f"pinned allocation 0x{a.base:x} ({a.size} B)" for a in self._allocs.values()
                if a.kind == "pinned" and not a.freed]
        out += [f"stream 0x{h:x}" for h, s in self._streams.items() if h and not s.destroyed]
        out += [f"event 0x{h:x}" for h, e in self._events.items() if not e.destroyed]
        out += [f"graph 0x{h:x}" for h, g in self._graphs.items() if not g.destroyed]
        out += [f"graph exec 0x{h:x}" for h, x in self._execs.items() if not x.destroyed]
        out += [f"{len(s.queue)} pending ops on stream 0x{h:x}" for h, s in self._streams.items() if s.queue]
        return out

    def assert_clean(self) -> None:
        leaks = self.leaks()
        self._check("leak.free_all", not leaks, "not released: " + ", ".join(leaks))

    def live_device_bytes(self) -> int:
        return sum(a.size for a in self._allocs.values() if a.kind == "device" and not a.freed)


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int | None:
    for p, n in a:
        for q, m in b:
            if n and m and p < q + m and q < p + n:
                return max(p, q)
    return None
