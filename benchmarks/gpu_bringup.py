"""GPU bring-up of the TensorRT backend's CUDA side, without TensorRT.

On a GPU machine that has cuda-python (``cuda.bindings``), CuPy and numpy but no TensorRT,
this exercises every cuda-python call the backend (``runtime/backends/tensorrt.py``) makes,
on the real GPU, through the backend's own code:

1. the ``_Cuda`` wrapper alone: device query, malloc/free, host<->device copies, memset,
   streams, events, stream capture of a memset, graph instantiate/launch/destroy;
2. ``TrtBackend.denoise``, the CUDA-graph denoising loop (warm-up, capture of the A/B graph
   pair with one context pair per graph on shared scratch, replay per step), with a CuPy
   stand-in for TensorRT: a minimal module with the TensorRT runtime API whose "engines"
   are CuPy kernels launched on the stream TensorRT would use (a toy eps model and the
   sampler-step update of ddpm / ddim / dpmpp). The GPU result is compared with the host
   sampler loop (``runtime.sampler.run``) driven by the same toy model in numpy;
3. teardown: device memory back to where it started.

It writes a JSON report (``--out``) with every check, and lists what it could not run
(TensorRT itself: engine deserialization, real kernels, FP16). Timings are of the toy
kernels: they show the graph replay path works, not how fast DiffEIC runs on a GPU.

``--simulate`` runs the same script on the strict simulator of ``tests/sim`` instead of a
GPU (numpy stand-ins), so CI proves the script itself.

    bash benchmarks/gpu_bringup.sh            # on the GPU machine (under 8 minutes)
    python benchmarks/gpu_bringup.py --simulate --out /tmp/bringup.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.engines import SAMPLER_STEP_PREFIX, STEP_COEF_KEYS, engine_io_names  # noqa: E402

log = logging.getLogger("gpu_bringup")
C = 4  # latent channels of the stand-in


# --------------------------------------------------------------------------- the toy model


def toy_eps(x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """eps = tanh(0.5 x + 0.1 c) * (1 + t / 1000), float32 (the stand-in control+UNet)."""
    f = np.float32
    return (np.tanh(f(0.5) * x + f(0.1) * c) * (f(1.0) + t.astype(np.float32)[0] * f(0.001))).astype(np.float32)


def toy_step(kind: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sampler-step engine of ``kind`` in numpy, the op order of export.build_engines."""
    with np.errstate(divide="ignore", invalid="ignore"):  # the warm-up runs on zeroed tables
        return _toy_step(kind, feeds)


def _toy_step(kind: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    idx = int(feeds["idx"][0])
    k = feeds["coefs"][idx]
    x, eps = feeds["x"], feeds["eps"]
    out: dict[str, np.ndarray] = {}
    if kind == "ddpm":
        pred = k[0] * x - k[1] * eps
        out["x_next"] = (k[2] * pred + k[3] * x) + k[4] * feeds["noise"][idx]
    elif kind == "ddim":
        out["x_next"] = k[2] * ((x - k[0] * eps) / k[1]) + k[3] * eps
    else:
        m = (x - k[0] * eps) / k[1]
        out["x_next"] = (k[2] * x - k[3] * m) - k[4] * (k[5] * (m - feeds["m_prev"]))
        out["m_next"] = m
    n = feeds["t_table"].shape[0]
    out["idx_next"] = np.array([idx + 1], np.int32)
    out["t_next"] = feeds["t_table"][min(idx + 1, n - 1):][:1].copy()
    return {key: v.astype(np.float32) if v.dtype.kind == "f" else v for key, v in out.items()}


CUDA_SRC = r"""
extern "C" __global__ void toy_eps(const float* x, const float* t, const float* c, float* eps, int n) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i < n) eps[i] = tanhf(0.5f * x[i] + 0.1f * c[i]) * (1.0f + t[0] * 0.001f);
}
extern "C" __global__ void step(const float* x, const float* eps, const int* idx, const float* coefs,
                                const float* t_table, const float* noise, const float* m_prev,
                                float* x_next, int* idx_next, float* t_next, float* m_next,
                                int n, int K, int steps, int kind) {
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    int s = idx[0];
    const float* k = coefs + s * K;
    if (i < n) {
        float xi = x[i], e = eps[i];
        if (kind == 0) {          // ddpm
            float pred = k[0] * xi - k[1] * e;
            x_next[i] = (k[2] * pred + k[3] * xi) + k[4] * noise[(long long)s * n + i];
        } else if (kind == 1) {   // ddim
            x_next[i] = k[2] * ((xi - k[0] * e) / k[1]) + k[3] * e;
        } else {                  // dpmpp
            float m = (xi - k[0] * e) / k[1];
            x_next[i] = (k[2] * xi - k[3] * m) - k[4] * (k[5] * (m - m_prev[i]));
            m_next[i] = m;
        }
    }
    if (i == 0) {
        int nx = s + 1;
        idx_next[0] = nx;
        t_next[0] = t_table[nx < steps ? nx : steps - 1];
    }
}
"""


# --------------------------------------------------------------------------- a CuPy "TensorRT"


class _CupyTrt:
    """The TensorRT runtime API subset of the backend, with CuPy kernels as engines (GPU only)."""

    __name__ = "tensorrt"
    __version__ = "10.0.0.0-cupy-standin"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class TensorIOMode:
        INPUT, OUTPUT = 1, 2

    class DataType:
        FLOAT, INT32 = 0, 3

    class ExecutionContextAllocationStrategy:
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = 0, 1, 2

    @staticmethod
    def nptype(dt: int) -> type:
        return np.float32 if dt == 0 else np.int32

    def __init__(self) -> None:
        import cupy

        self.cp = cupy
        self.module = cupy.RawModule(code=CUDA_SRC, options=("--fmad=false",))
        self.kernels_launched = 0

    def Runtime(self, logger: Any) -> Any:  # noqa: N802
        trt = self

        class _Runtime:
            def deserialize_cuda_engine(self, data: bytes) -> Any:
                head = json.loads(bytes(data).split(b"\n", 1)[0])
                return _CupyEngine(trt, head)

        return _Runtime()


class _CupyEngine:
    def __init__(self, trt: _CupyTrt, head: dict[str, Any]) -> None:
        self.trt, self.head = trt, head
        self.io = [(n, d, tuple(s), m) for n, d, s, m in head["io"]]
        self.device_memory_size_v2 = 1 << 16

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def _t(self, name: str) -> tuple:
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name: str) -> int:
        return 1 if self._t(name)[3] else 2

    def get_tensor_dtype(self, name: str) -> int:
        return 0 if self._t(name)[1] == "float32" else 3

    def get_tensor_shape(self, name: str) -> tuple:
        return self._t(name)[2]

    def get_tensor_profile_shape(self, name: str, k: int) -> list:
        lo, opt, hi = self.head["profile"][name]
        return [tuple(lo), tuple(opt), tuple(hi)]

    def create_execution_context(self, strategy: int = 0) -> "_CupyContext":
        return _CupyContext(self)


class _CupyContext:
    def __init__(self, engine: _CupyEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addr: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        if name in self.shapes:
            return self.shapes[name]
        n, _, shape, is_in = self.engine._t(name)
        if name in ("idx_next", "t_next"):
            return (1,)
        return self.shapes["x_t" if "x_t" in self.shapes else "x"]  # eps, x_next, m_next: the latent's

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if int(ptr) % 256:
            return False
        self.addr[name] = int(ptr)
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.scratch = (int(ptr), int(size))

    def is_stream_capturable(self, stream: int) -> bool:
        return True

    def execute_async_v3(self, stream: int) -> bool:
        trt = self.engine.trt
        cp = trt.cp
        kind = self.engine.head["kind"]
        a = self.addr
        p = lambda name: np.uint64(a.get(name, 0))  # noqa: E731
        with cp.cuda.ExternalStream(int(stream)):
            if kind == "eps":
                n = int(np.prod(self.shapes["x_t"]))
                trt.module.get_function("toy_eps")(((n + 255) // 256,), (256,),
                                                   (p("x_t"), p("t"), p("c_latent"), p("eps"), np.int32(n)))
            else:
                n = int(np.prod(self.shapes["x"]))
                steps, K = self.shapes["coefs"]
                code = {"ddpm": 0, "ddim": 1, "dpmpp": 2}[kind]
                trt.module.get_function("step")(
                    ((n + 255) // 256,), (256,),
                    (p("x"), p("eps"), p("idx"), p("coefs"), p("t_table"), p("noise"), p("m_prev"), p("x_next"),
                     p("idx_next"), p("t_next"), p("m_next"), np.int32(n), np.int32(K), np.int32(steps),
                     np.int32(code)))
        trt.kernels_launched += 1
        return True


# --------------------------------------------------------------------------- artifacts for the backend


def _io(kind: str) -> list[tuple[str, str, tuple[int, ...], bool]]:
    lat = (1, C, -1, -1)
    if kind == "eps":
        return [("x_t", "float32", lat, True), ("t", "float32", (1,), True), ("c_latent", "float32", lat, True),
                ("eps", "float32", lat, False)]
    ins, outs = engine_io_names(kind)
    shapes = {"x": lat, "eps": lat, "idx": (1,), "coefs": (-1, len(STEP_COEF_KEYS[kind])), "t_table": (-1,),
              "noise": (-1, 1, C, -1, -1), "m_prev": lat, "x_next": lat, "idx_next": (1,), "t_next": (1,),
              "m_next": lat}
    dt = lambda n: "int32" if n.startswith("idx") else "float32"  # noqa: E731
    return [(n, dt(n), shapes[n], True) for n in ins] + [(n, dt(n), shapes[n], False) for n in outs]


def _profile(kind: str, lat_hw: tuple[int, int], steps: int) -> dict[str, list]:
    h, w = lat_hw
    lo, hi = (8, 8), (max(h, 64), max(w, 64))
    out: dict[str, list] = {}
    for n, _, shape, is_in in _io(kind):
        if not is_in:
            continue
        if shape == (1, C, -1, -1):
            out[n] = [[1, C, *lo], [1, C, h, w], [1, C, *hi]]
        elif n == "coefs":
            out[n] = [[1, shape[1]], [steps, shape[1]], [1000, shape[1]]]
        elif n == "t_table":
            out[n] = [[1], [steps], [1000]]
        elif n == "noise":
            out[n] = [[1, 1, C, *lo], [steps, 1, C, h, w], [1000, 1, C, *hi]]
        else:
            out[n] = [list(shape)] * 3
    return out


def write_artifacts(directory: Path, trt_version: str, gpu: tuple[str, str], plans: dict[str, bytes]) -> Path:
    """A minimal artifact directory: control_unet + the three step engines, as the backend reads it."""
    from runtime.manifest import FORMAT_VERSION, sha256_file

    (directory / "engines").mkdir(parents=True, exist_ok=True)
    (directory / "tables.npz").write_bytes(b"unused")
    engines = {}
    for key, plan in plans.items():
        f = f"engines/{key}.plan"
        (directory / f).write_bytes(plan)
        engines[key] = {"network": key, "file": f, "sha256": sha256_file(directory / f), "trt_version": trt_version,
                        "gpu": gpu[0], "compute_capability": gpu[1], "precision": "fp32", "profile": {},
                        "fingerprint": "00" * 32}
    raw = {"format_version": FORMAT_VERSION, "fingerprint": "00" * 32, "model": {"latent_channels": C},
           "networks": {"control_unet": {
               "name": "control_unet", "file": "control_unet.onnx", "sha256": "0" * 64,
               "inputs": [{"name": "x_t", "dtype": "float32", "shape": [1, C, "h8", "w8"]},
                          {"name": "t", "dtype": "float32", "shape": [1]},
                          {"name": "c_latent", "dtype": "float32", "shape": [1, C, "h8", "w8"]}],
               "outputs": [{"name": "eps", "dtype": "float32", "shape": [1, C, "h8", "w8"]}]}},
           "engines": engines, "tables_file": "tables.npz", "tables_sha256": sha256_file(directory / "tables.npz"),
           "opset": 18, "versions": {}}
    (directory / "manifest.json").write_text(json.dumps(raw))
    return directory


# --------------------------------------------------------------------------- the checks


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[dict[str, Any]]:
        rec: dict[str, Any] = {"name": name}
        t0 = time.perf_counter()
        try:
            yield rec
            rec["ok"] = True
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the script goes on
            rec["ok"] = False
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=6)
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        self.checks.append(rec)
        log.info("%s %s%s", "ok  " if rec["ok"] else "FAIL", name, "" if rec["ok"] else f": {rec['error']}")


def check_cuda_wrapper(rep: Report) -> None:
    from runtime.backends.tensorrt import _Cuda

    cuda = _Cuda()
    rt = cuda.rt
    with rep.check("cudaGetDevice + cudaGetDeviceProperties") as r:
        r["gpu"], r["compute_capability"] = cuda.device()
    with rep.check("cudaStreamCreate / cudaMalloc / cudaMemcpyAsync H2D+D2H / cudaStreamSynchronize / cudaFree") as r:
        s = cuda.call(rt.cudaStreamCreate())
        a = np.arange(1 << 16, dtype=np.float32)
        p = cuda.malloc(a.nbytes)
        cuda.h2d(p, a, s)
        b = np.empty_like(a)
        cuda.d2h(b, p, s)
        cuda.sync(s)
        assert np.array_equal(a, b), "round trip differs"
        cuda.call(rt.cudaMemsetAsync(p, 0, a.nbytes, s))
        cuda.d2h(b, p, s)
        cuda.sync(s)
        assert not b.any(), "memset did not zero"
        r["bytes"] = a.nbytes
    with rep.check("cudaEventCreate / cudaEventRecord / cudaEventSynchronize / cudaEventElapsedTime") as r:
        e0, e1 = cuda.call(rt.cudaEventCreate()), cuda.call(rt.cudaEventCreate())
        cuda.call(rt.cudaEventRecord(e0, s))
        cuda.h2d(p, a, s)
        cuda.call(rt.cudaEventRecord(e1, s))
        cuda.call(rt.cudaEventSynchronize(e1))
        r["h2d_ms"] = cuda.call(rt.cudaEventElapsedTime(e0, e1))
        cuda.call(rt.cudaEventDestroy(e0))
        cuda.call(rt.cudaEventDestroy(e1))
    with rep.check("cudaStreamBeginCapture(ThreadLocal) / cudaStreamEndCapture / cudaGraphInstantiate / "
                   "cudaGraphLaunch / cudaGraphExecDestroy / cudaGraphDestroy") as r:
        cuda.call(rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        cuda.call(rt.cudaMemsetAsync(p, 0, a.nbytes, s))
        g = cuda.call(rt.cudaStreamEndCapture(s))
        ex = cuda.call(rt.cudaGraphInstantiate(g, 0))
        cuda.call(rt.cudaGraphDestroy(g))
        cuda.h2d(p, a, s)
        cuda.call(rt.cudaGraphLaunch(ex, s))  # replays the memset
        cuda.d2h(b, p, s)
        cuda.sync(s)
        assert not b.any(), "graph replay did not run the captured memset"
        cuda.call(rt.cudaGraphExecDestroy(ex))
    with rep.check("capture rules: cudaMalloc inside a capture is refused and invalidates it") as r:
        cuda.call(rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        err, _ = rt.cudaMalloc(256)
        err2, g = rt.cudaStreamEndCapture(s)
        r["malloc_error"], r["end_capture_error"] = int(err), int(err2)
        assert int(err) != 0 and g is None, "an allocation inside a capture was accepted"
    cuda.free(p)
    cuda.call(rt.cudaStreamDestroy(s))


def free_device_bytes() -> int:
    from runtime.engines import import_cudart

    rt = import_cudart()
    err, free, total = rt.cudaMemGetInfo()
    return int(free)


def check_denoise(rep: Report, trt: Any, make_plans: Callable[[tuple[int, int], int], dict[str, bytes]],
                  gpu: tuple[str, str]) -> None:
    from runtime.backends.tensorrt import TrtBackend
    from runtime.config import defaults
    from runtime.manifest import load_manifest
    from runtime.sampler import GaussianNoise, make_sampler, run

    cases = [("ddim", 10, (64, 96)), ("ddpm", 8, (64, 96)), ("dpmpp", 10, (64, 96)), ("ddim", 10, (32, 48))]
    before = free_device_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        d = write_artifacts(Path(tmp), f"{trt.__name__}-{trt.__version__}", gpu, make_plans((64, 96), 50))
        manifest, d = load_manifest(d)
        backend = TrtBackend(manifest, d, defaults().with_(backend="trt", verify_hashes=True), allow_other_gpu=True)
        try:
            for kind, steps, hw in cases:
                with rep.check(f"TrtBackend.denoise {kind} {steps} steps, latent {hw} (CUDA graphs) vs host loop") as r:
                    sampler = make_sampler(kind, steps)
                    rng = np.random.default_rng(0)
                    x_T = rng.standard_normal((1, C) + hw, dtype=np.float32)
                    c = rng.standard_normal((1, C) + hw, dtype=np.float32)
                    t0 = time.perf_counter()
                    got = backend.denoise(sampler, x_T, c, GaussianNoise(1))
                    r["first_call_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    again = backend.denoise(sampler, x_T, c, GaussianNoise(1))
                    r["replay_call_s"] = time.perf_counter() - t0
                    want = run(sampler, x_T, lambda x, t: toy_eps(x, np.array([t], np.float32), c), GaussianNoise(1))
                    r["max_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
                    r["captures"], r["replays"] = backend._graphs.captures, sum(  # type: ignore[attr-defined]
                        e.replays for e in backend._graphs._entries.values())  # type: ignore[attr-defined]
                    assert np.array_equal(got, again), "a replay gave another result"
                    assert r["max_rel_err"] < 1e-4, f"GPU loop differs from the host loop by {r['max_rel_err']:.2e}"
        finally:
            backend.close()
            del backend
            gc.collect()
    with rep.check("teardown: device memory returned") as r:
        r["free_before"], r["free_after"] = before, free_device_bytes()
        assert r["free_after"] >= before - (8 << 20), "device memory was not returned"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--simulate", action="store_true", help="run on the tests/sim simulator instead of a GPU")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_bringup.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rep = Report()
    report: dict[str, Any] = {"mode": "simulator (not a GPU)" if a.simulate else "GPU", "python": platform.python_version(),
                              "numpy": np.__version__}
    cannot = ["TensorRT engines (no tensorrt here): deserialization, real kernels, FP16 accuracy, timing caches",
              "the DiffEIC networks on the GPU (the engines are CuPy toy stand-ins)",
              "onnxruntime-gpu (CUDA execution provider)"]
    if a.simulate:
        sys.path.insert(0, str(REPO / "tests"))
        from sim import SimTensorRT, Simulator, installed
        from sim.tensorrt import IOSpec

        # faithful mode: broken rules return CUDA's error codes (as the GPU would) and are recorded
        cuda = Simulator("NVIDIA H100 80GB HBM3", "9.0", strict=False)
        trt = SimTensorRT(cuda, "tensorrt", "10.13.0.35")

        def make_plans(hw: tuple[int, int], steps: int) -> dict[str, bytes]:
            plans = {}
            for kind in ("eps", "ddpm", "ddim", "dpmpp"):
                io = [IOSpec(n, np.dtype(dt), s, i) for n, dt, s, i in _io(kind)]
                prof = {k: tuple(tuple(v) for v in vs) for k, vs in _profile(kind, hw, steps).items()}
                if kind == "eps":
                    fn = lambda f: {"eps": toy_eps(f["x_t"], f["t"], f["c_latent"])}  # noqa: E731
                    shp = lambda s: {"eps": s["x_t"]}  # noqa: E731
                else:
                    fn = lambda f, k=kind: toy_step(k, f)  # noqa: E731
                    shp = lambda s, k=kind: {"x_next": s["x"], "idx_next": (1,), "t_next": (1,),  # noqa: E731
                                             **({"m_next": s["x"]} if k == "dpmpp" else {})}
                name = "control_unet" if kind == "eps" else SAMPLER_STEP_PREFIX + kind
                plans[name] = trt.make_plan(name, io, fn, shp, prof)
            return plans

        with installed(cuda, trt):
            check_cuda_wrapper(rep)
            check_denoise(rep, trt, make_plans, ("NVIDIA H100 80GB HBM3", "9.0"))
            gc.collect()
            with rep.check("simulator: nothing leaked, no rule broken but the deliberate one") as r:
                r["leaks"] = cuda.leaks()
                r["rule_checks"] = sum(cuda.checks.values())
                r["violations"] = [str(v) for v in cuda.violations]
                assert not r["leaks"], r["leaks"]
                assert [v.rule for v in cuda.violations] == ["capture.unsafe_call"], r["violations"]
        report["gpu"] = "simulated"
    else:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            report["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            report["nvidia_smi"] = f"unavailable: {exc}"
        try:
            import cupy

            report["cupy"] = cupy.__version__
            import cuda.bindings  # noqa: F401

            report["cuda_bindings"] = getattr(sys.modules["cuda.bindings"], "__version__", "?")
        except ImportError as exc:
            report["error"] = f"missing package: {exc}"
            cannot.append(f"everything: {exc}")
        if "error" not in report:
            check_cuda_wrapper(rep)
            from runtime.engines import gpu_device

            gpu = gpu_device()
            trt = _CupyTrt()
            sys.modules["tensorrt"] = trt  # type: ignore[assignment]

            def make_plans(hw: tuple[int, int], steps: int) -> dict[str, bytes]:
                plans = {}
                for kind in ("eps", "ddpm", "ddim", "dpmpp"):
                    head = {"kind": kind, "io": _io(kind), "profile": _profile(kind, hw, steps)}
                    name = "control_unet" if kind == "eps" else SAMPLER_STEP_PREFIX + kind
                    plans[name] = (json.dumps(head) + "\n").encode() + hashlib.sha256(name.encode()).digest()
                return plans

            check_denoise(rep, trt, make_plans, gpu)
            report["gpu"], report["kernels_launched"] = gpu, trt.kernels_launched
    report["checks"] = rep.checks
    report["passed"] = sum(c["ok"] for c in rep.checks)
    report["failed"] = sum(not c["ok"] for c in rep.checks)
    report["could_not_run"] = cannot
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"{report['passed']} passed, {report['failed']} failed")
    return 0 if report["failed"] == 0 and "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
