"""The TensorRT backend, end to end, on the strict CUDA/TensorRT simulator (``tests/sim``).

This is a simulator, not a GPU: it proves the backend's use of the TensorRT and CUDA APIs
(shapes, addresses, buffers, streams, capture and replay of the denoising loop, teardown)
and its numerics against ONNX Runtime, not GPU speed or GPU kernels. Engines are real
TensorRT-RTX AOT builds of the fixture's graphs; the simulator runs the ONNX each plan was
built from. Every rule of the simulator is also broken on purpose below and must fail with
the simulator's error.
"""

from __future__ import annotations

import gc
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.config import defaults
from runtime.pipeline import Codec
from runtime.sampler import make_sampler
from sim import RULES, SimTensorRT, Simulator, SimulatorError, installed, record_builds
from sim.tensorrt import IOSpec

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx)")
GPU = ("NVIDIA GeForce RTX 4090", "8.9")  # the AOT target (SM 8.9) of the builds below
LATENT_TOL = 1e-5  # relative to the largest value: float32 noise
CHECKS: dict[str, int] = {}  # rule -> times checked, summed over this module's simulators


def _tally(cuda: Simulator) -> None:
    for k, v in cuda.checks.items():
        CHECKS[k] = CHECKS.get(k, 0) + v


@pytest.fixture(scope="module")
def engines(fixture_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The fixture artifacts with TensorRT-RTX engines (FP32; static tile engines for the VAE)."""
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx not installed")
    from export.build_engines import build_all

    d = Path(shutil.copytree(fixture_artifacts, tmp_path_factory.mktemp("trt") / "art"))
    registry: dict = {}
    with record_builds(registry):
        build_all(d, None, fp16=False, builder="tensorrt_rtx", compute_capability="89",
                  min_hw=(64, 64), opt_hw=(128, 192), max_hw=(256, 384), tile=128)
    return d, registry


def _sim(registry: dict, **kw: object) -> tuple[Simulator, SimTensorRT]:
    import tensorrt_rtx

    cuda = Simulator(*GPU, **kw)  # type: ignore[arg-type]
    return cuda, SimTensorRT(cuda, "tensorrt_rtx", tensorrt_rtx.__version__, registry)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-6))


def _streams(codec: Codec, fixture_dir: Path) -> list[bytes]:
    """Streams of three sizes: the fixture's (128x192), a crop (64x64 padded) and 192x128."""
    img = np.asarray(Image.open(fixture_dir / "input.png").convert("RGB"))
    tall = np.ascontiguousarray(np.concatenate([img, img[::-1]], axis=0)[:192, :128])
    return [(fixture_dir / "stream.bin").read_bytes(), codec.encode(img[:50, :60]).data, codec.encode(tall).data]


@needs_rtx
@pytest.mark.parametrize("sampler, steps", [("ddpm", 4), ("ddim", 4), ("ddpm", 50), ("ddim", 50), ("dpmpp", 10)])
def test_trt_decode_on_simulator_matches_ort(engines: tuple[Path, dict], fixture_dir: Path,
                                             sampler: str, steps: int) -> None:
    d, registry = engines
    ort_codec = Codec(d, defaults().with_(backend="ort"))
    streams = _streams(ort_codec, fixture_dir)
    cuda, trt = _sim(registry)
    with installed(cuda, trt):
        codec = Codec(d, defaults().with_(backend="trt"))
        try:
            # several sizes in a row; the first size again while its graphs are cached (2 entries, LRU)
            for data in [streams[0], streams[1], streams[0], streams[2]]:
                a = ort_codec.decode(data, sampler=sampler, steps=steps)
                b = codec.decode(data, sampler=sampler, steps=steps)
                assert _rel(b.c_latent, a.c_latent) < LATENT_TOL
                assert _rel(b.samples, a.samples) < LATENT_TOL
                assert a.image.shape == b.image.shape
                assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
            g = codec.backend._graphs  # type: ignore[attr-defined]
            assert g.captures == 3 and g.hits == 1  # one capture per latent size; the 3rd decode replays
            n = len(make_sampler(sampler, steps).timesteps)
            assert cuda.replayed_ops == 2 * n * (len(streams) + 1)  # every step of every decode: one graph replay
        finally:
            codec.close()
            del codec
            gc.collect()
        cuda.assert_clean()  # every allocation, stream, graph and exec released
    assert not cuda.violations
    _tally(cuda)
    ort_codec.close()


@needs_rtx
def test_decode_cli_with_backend_trt_on_simulator(engines: tuple[Path, dict], fixture_dir: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The user's own command: ``python -m runtime.decode --engine engines/control_unet.plan --backend trt``."""
    from runtime.decode import main

    d, registry = engines
    cuda, trt = _sim(registry)
    out = tmp_path / "o.png"
    with installed(cuda, trt):
        rc = main([str(fixture_dir / "stream.bin"), "-o", str(out), "--engine", str(d / "engines" / "control_unet.plan"),
                   "--backend", "trt", "--sampler", "ddim", "--steps", "4", "--size", "128x192"])
        gc.collect()
    assert rc == 0, capsys.readouterr().err
    ort_out = tmp_path / "ort.png"
    from runtime.decode import main as ort_main

    assert ort_main([str(fixture_dir / "stream.bin"), "-o", str(ort_out), "--engine", str(d), "--sampler", "ddim",
                     "--steps", "4", "--size", "128x192"]) == 0
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (out, ort_out))
    assert np.abs(a - b).max() <= 1
    cuda.assert_clean()
    _tally(cuda)


@needs_rtx
def test_uncapturable_engines_fall_back_to_the_step_loop(engines: tuple[Path, dict], fixture_dir: Path) -> None:
    """An RTX engine built without REQUIRE_USER_ALLOCATION: is_stream_capturable says no, the
    backend runs the loop step by step instead of failing, with the same result."""
    d, registry = engines
    plain = {k: type(v)(**{**v.__dict__, "build_flags": frozenset()}) for k, v in registry.items()}
    cuda, trt = _sim(plain)
    data = (fixture_dir / "stream.bin").read_bytes()
    with installed(cuda, trt):
        codec = Codec(d, defaults().with_(backend="trt"))
        b = codec.decode(data, sampler="ddim", steps=4)
        assert codec.backend._graphs.captures == 0 and cuda.replayed_ops == 0  # type: ignore[attr-defined]
        codec.close()
        del codec
        gc.collect()
    ort_codec = Codec(d, defaults().with_(backend="ort"))
    a = ort_codec.decode(data, sampler="ddim", steps=4)
    assert _rel(b.samples, a.samples) < LATENT_TOL
    cuda.assert_clean()
    _tally(cuda)


@needs_rtx
def test_tiled_vae_on_simulator_uses_the_tile_engines(engines: tuple[Path, dict], fixture_dir: Path) -> None:
    """Tiled encode and decode through TensorRT run the static 128 px tile engines and give
    what ONNX Runtime gives with the same tiles."""
    d, registry = engines
    img = np.asarray(Image.open(fixture_dir / "input.png").convert("RGB"))
    big = np.ascontiguousarray(np.concatenate([np.concatenate([img, img[::-1]], 0)] * 2, 1))  # 256 x 384
    ort_codec = Codec(d, defaults().with_(backend="ort", tile=128))
    cuda, trt = _sim(registry)
    with installed(cuda, trt):
        codec = Codec(d, defaults().with_(backend="trt", tile=128))
        try:
            a_enc, b_enc = ort_codec.encode(big, sampler="ddim", steps=4), codec.encode(big, sampler="ddim", steps=4)
            assert a_enc.vae_tile == b_enc.vae_tile == 128
            a, b = ort_codec.decode(a_enc.data), codec.decode(a_enc.data)
            assert a.vae_tile == b.vae_tile == 128
            assert _rel(b.samples, a.samples) < LATENT_TOL
            assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
            loaded = set(codec.backend._engines)  # type: ignore[attr-defined]
            assert {"vae_decoder@128x128", "vae_encoder@128x128"} <= loaded, loaded
            assert "vae_decoder" not in loaded  # the dynamic engine was never needed
        finally:
            codec.close()
            del codec
            gc.collect()
        cuda.assert_clean()
    _tally(cuda)
    ort_codec.close()


@needs_rtx
def test_image_outside_the_engine_profile_is_a_clear_error(engines: tuple[Path, dict], fixture_dir: Path) -> None:
    """The engines were built for at most 256x384; a 320x448 stream is refused with the remedy
    (it used to reach TensorRT, whose set_input_shape returned False unnoticed)."""
    d, registry = engines
    img = np.asarray(Image.open(fixture_dir / "input.png").convert("RGB"))
    big = np.ascontiguousarray(np.tile(img, (3, 3, 1))[:300, :420])
    ort_codec = Codec(d, defaults().with_(backend="ort"))
    data = ort_codec.encode(big, sampler="ddim", steps=4).data
    cuda, trt = _sim(registry)
    with installed(cuda, trt):
        codec = Codec(d, defaults().with_(backend="trt"))
        with pytest.raises(ValueError, match="outside the engine profile.*--max.*--backend ort"):
            codec.decode(data)
        codec.close()
        del codec
        gc.collect()
    assert not cuda.violations
    ort_codec.close()


# --------------------------------------------------------------------------- rules, broken on purpose


def _pair() -> tuple[Simulator, SimTensorRT, bytes]:
    cuda = Simulator(*GPU)
    trt = SimTensorRT(cuda, "tensorrt", "10.13.0.35")
    io = [IOSpec("x", np.dtype(np.float32), (1, -1), True), IOSpec("y", np.dtype(np.float32), (1, -1), False)]
    plan = trt.make_plan("double", io, lambda f: {"y": f["x"] * 2}, lambda s: {"y": s["x"]},
                         profile={"x": ((1, 1), (1, 8), (1, 64))})
    return cuda, trt, plan


def _ok(result: tuple) -> object:
    assert int(result[0]) == 0, result
    return result[1] if len(result) > 1 else None


def _bound(n: int = 8) -> tuple[Simulator, SimTensorRT, object, object, int, int, object]:
    cuda, trt, plan = _pair()
    eng = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    ctx = eng.create_execution_context()
    x, y = _ok(cuda.cudaMalloc(4 * n)), _ok(cuda.cudaMalloc(4 * n))
    stream = _ok(cuda.cudaStreamCreate())
    assert ctx.set_input_shape("x", (1, n)) and ctx.set_tensor_address("x", x) and ctx.set_tensor_address("y", y)
    return cuda, trt, eng, ctx, x, y, stream


def test_rule_enqueue_needs_shapes_and_addresses() -> None:
    cuda, trt, plan = _pair()
    ctx = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan).create_execution_context()
    stream = _ok(cuda.cudaStreamCreate())
    with pytest.raises(SimulatorError, match="trt.enqueue_ready.*input shapes unset for \\['x'\\]"):
        ctx.execute_async_v3(int(stream))
    ctx.set_input_shape("x", (1, 8))
    with pytest.raises(SimulatorError, match="trt.enqueue_ready.*addresses unset for \\['x', 'y'\\]"):
        ctx.execute_async_v3(int(stream))
    small = _ok(cuda.cudaMalloc(16))
    ctx.set_tensor_address("x", small)
    ctx.set_tensor_address("y", _ok(cuda.cudaMalloc(32)))
    with pytest.raises(SimulatorError, match="trt.enqueue_ready.*'x'.*32 B for shape \\(1, 8\\).*bounds"):
        ctx.execute_async_v3(int(stream))


def test_rule_input_shape_profile_and_address_alignment() -> None:
    cuda, trt, eng, ctx, x, y, stream = _bound()
    with pytest.raises(SimulatorError, match="trt.input_shape.*outside the profile"):
        ctx.set_input_shape("x", (1, 65))
    with pytest.raises(SimulatorError, match="trt.input_shape.*'y' is not an input"):
        ctx.set_input_shape("y", (1, 8))
    with pytest.raises(SimulatorError, match="trt.address.*not 256-byte aligned"):
        ctx.set_tensor_address("x", x + 4)


def test_rule_no_output_aliasing_an_input() -> None:
    cuda, trt, eng, ctx, x, y, stream = _bound()
    ctx.set_tensor_address("y", x)  # an engine writing its own input
    with pytest.raises(SimulatorError, match="trt.io_alias.*'y' overlaps input 'x'"):
        ctx.execute_async_v3(int(stream))


def test_rule_no_sync_or_allocation_inside_capture() -> None:
    cuda, trt, eng, ctx, x, y, stream = _bound()
    mode = cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    _ok(cuda.cudaStreamBeginCapture(stream, mode))
    with pytest.raises(SimulatorError, match="capture.unsafe_call.*cudaMalloc"):
        cuda.cudaMalloc(64)
    with pytest.raises(SimulatorError, match="capture.sync.*cudaStreamSynchronize"):
        cuda.cudaStreamSynchronize(stream)
    with pytest.raises(SimulatorError, match="capture.pageable_memcpy"):
        cuda.cudaMemcpyAsync(x, np.zeros(8, np.float32), 32, cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
    # faithful mode: the documented codes, and the capture is invalidated
    lax = Simulator(*GPU, strict=False)
    s = _ok(lax.cudaStreamCreate())
    _ok(lax.cudaStreamBeginCapture(s, mode))
    assert int(lax.cudaMalloc(64)[0]) == 900  # cudaErrorStreamCaptureUnsupported
    err, graph = lax.cudaStreamEndCapture(s)
    assert int(err) == 901 and graph is None  # cudaErrorStreamCaptureInvalidated
    assert [v.rule for v in lax.violations] == ["capture.unsafe_call"]


def test_rule_first_enqueue_not_inside_capture() -> None:
    cuda, trt, eng, ctx, x, y, stream = _bound()
    _ok(cuda.cudaStreamBeginCapture(stream, cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
    with pytest.raises(SimulatorError, match="trt.capture_warmup"):
        ctx.execute_async_v3(int(stream))


def test_rule_graph_replays_recorded_operations_only() -> None:
    """A per-step host update that was not captured is lost on replay, as on a GPU; the
    simulator refuses the re-binding of a captured context outright."""
    cuda, trt, eng, ctx, x, y, stream = _bound()
    host = np.arange(8, dtype=np.float32)
    _ok(cuda.cudaMemcpyAsync(x, host, 32, cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
    assert ctx.execute_async_v3(int(stream))  # warm-up
    _ok(cuda.cudaStreamSynchronize(stream))
    _ok(cuda.cudaStreamBeginCapture(stream, cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
    assert ctx.execute_async_v3(int(stream))
    graph = _ok(cuda.cudaStreamEndCapture(stream))
    exe = _ok(cuda.cudaGraphInstantiate(graph, 0))
    _ok(cuda.cudaGraphDestroy(graph))
    other = _ok(cuda.cudaMalloc(32))
    with pytest.raises(SimulatorError, match="trt.context_after_capture.*set_tensor_address"):
        ctx.set_tensor_address("x", other)
    # a host-side change of the input between replays (no copy enqueued) is not seen
    host[:] = 100.0
    _ok(cuda.cudaGraphLaunch(exe, stream))
    out = np.empty(8, np.float32)
    _ok(cuda.cudaMemcpyAsync(out, y, 32, cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    _ok(cuda.cudaStreamSynchronize(stream))
    np.testing.assert_array_equal(out, np.arange(8, dtype=np.float32) * 2)
    # the enqueue outside the graph on the captured context is refused too
    with pytest.raises(SimulatorError, match="trt.context_after_capture.*execute_async_v3"):
        ctx.execute_async_v3(int(stream))
    _ok(cuda.cudaGraphExecDestroy(exe))
    assert ctx.set_tensor_address("x", other)  # no live graph replays it any more


def test_rule_read_before_sync_and_free_while_pending() -> None:
    cuda, trt, eng, ctx, x, y, stream = _bound()
    _ok(cuda.cudaMemcpyAsync(x, np.ones(8, np.float32), 32, cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
    assert ctx.execute_async_v3(int(stream))
    out = np.zeros(8, np.float32)
    _ok(cuda.cudaMemcpyAsync(out, y, 32, cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    assert np.isnan(out).all()  # before the sync the buffer holds garbage, as on a GPU ...
    assert "host.read_after_sync" in (cuda.explain_host(out) or "")  # ... and the simulator says why
    with pytest.raises(SimulatorError, match="host.read_after_sync"):  # handing it on to the GPU is refused
        cuda.cudaMemcpyAsync(x, out, 32, cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
    with pytest.raises(SimulatorError, match="device.free_pending"):
        cuda.cudaFree(y)
    _ok(cuda.cudaStreamSynchronize(stream))
    np.testing.assert_array_equal(out, 2.0)
    assert cuda.explain_host(out) is None
    pinned = _ok(cuda.cudaMallocHost(32))
    _ok(cuda.cudaMemcpyAsync(pinned, y, 32, cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    with pytest.raises(SimulatorError, match="host.read_after_sync"):
        cuda.host_array(pinned, (8,), np.float32)
    _ok(cuda.cudaStreamSynchronize(stream))
    np.testing.assert_array_equal(cuda.host_array(pinned, (8,), np.float32), 2.0)


def test_rule_cross_stream_race_and_event_ordering() -> None:
    cuda, trt, eng, ctx, x, y, stream = _bound()
    other = _ok(cuda.cudaStreamCreate())
    assert ctx.execute_async_v3(int(stream))  # writes y on `stream`
    out = np.empty(8, np.float32)
    with pytest.raises(SimulatorError, match="stream.race"):
        cuda.cudaMemcpyAsync(out, y, 32, cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, other)
    ev = _ok(cuda.cudaEventCreate())
    _ok(cuda.cudaEventRecord(ev, stream))
    _ok(cuda.cudaStreamWaitEvent(other, ev, 0))
    _ok(cuda.cudaMemcpyAsync(out, y, 32, cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, other))  # ordered: fine
    _ok(cuda.cudaStreamSynchronize(other))


def test_rule_memory_bounds_use_after_free_double_free_and_leaks() -> None:
    cuda = Simulator(*GPU)
    s = _ok(cuda.cudaStreamCreate())
    p = _ok(cuda.cudaMalloc(64))
    with pytest.raises(SimulatorError, match="device.bounds"):
        cuda.cudaMemsetAsync(p + 32, 0, 64, s)
    with pytest.raises(SimulatorError, match="memcpy.kind"):
        cuda.cudaMemcpyAsync(p, np.zeros(4, np.float32), 16, cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, s)
    _ok(cuda.cudaFree(p))
    with pytest.raises(SimulatorError, match="device.use_after_free"):
        cuda.cudaMemsetAsync(p, 0, 8, s)
    with pytest.raises(SimulatorError, match="device.double_free"):
        cuda.cudaFree(p)
    with pytest.raises(TypeError, match="cudaMemcpyKind"):
        cuda.cudaMemcpyAsync(p, p, 0, 1, s)  # cuda-python takes the enum, not an int
    with pytest.raises(SimulatorError, match="leak.free_all.*stream"):
        cuda.assert_clean()


def test_rule_capture_pairing_and_graph_handles() -> None:
    cuda = Simulator(*GPU)
    s = _ok(cuda.cudaStreamCreate())
    mode = cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    with pytest.raises(SimulatorError, match="capture.state.*not capturing"):
        cuda.cudaStreamEndCapture(s)
    with pytest.raises(SimulatorError, match="capture.state.*legacy default stream"):
        cuda.cudaStreamBeginCapture(0, mode)
    _ok(cuda.cudaStreamBeginCapture(s, mode))
    g = _ok(cuda.cudaStreamEndCapture(s))
    e = _ok(cuda.cudaGraphInstantiate(g, 0))
    _ok(cuda.cudaGraphExecDestroy(e))
    with pytest.raises(SimulatorError, match="graph.valid"):
        cuda.cudaGraphLaunch(e, s)


def test_rule_rtx_capture_needs_user_allocation() -> None:
    cuda = Simulator(*GPU)
    trt = SimTensorRT(cuda, "tensorrt_rtx", "1.7.1.116")
    io = [IOSpec("x", np.dtype(np.float32), (4,), True), IOSpec("y", np.dtype(np.float32), (4,), False)]
    plan = trt.make_plan("id", io, lambda f: {"y": f["x"]}, lambda s: {"y": s["x"]}, build_flags=())
    ctx = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan).create_execution_context()
    x, y, s = _ok(cuda.cudaMalloc(16)), _ok(cuda.cudaMalloc(16)), _ok(cuda.cudaStreamCreate())
    ctx.set_input_shape("x", (4,))
    ctx.set_tensor_address("x", x)
    ctx.set_tensor_address("y", y)
    assert not ctx.is_stream_capturable(int(s))
    assert ctx.execute_async_v3(int(s))
    _ok(cuda.cudaStreamBeginCapture(s, cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
    with pytest.raises(SimulatorError, match="trt.capturable.*REQUIRE_USER_ALLOCATION"):
        ctx.execute_async_v3(int(s))


def test_rule_user_managed_context_needs_device_memory() -> None:
    cuda, trt, plan = _pair()
    eng = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    ctx = eng.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    x, y, s = _ok(cuda.cudaMalloc(32)), _ok(cuda.cudaMalloc(32)), _ok(cuda.cudaStreamCreate())
    ctx.set_input_shape("x", (1, 8))
    ctx.set_tensor_address("x", x)
    ctx.set_tensor_address("y", y)
    with pytest.raises(SimulatorError, match="trt.device_memory.*without set_device_memory"):
        ctx.execute_async_v3(int(s))
    with pytest.raises(SimulatorError, match="trt.device_memory.*smaller than"):
        ctx.set_device_memory(_ok(cuda.cudaMalloc(16)), 16)


def test_rule_plan_must_match_runtime_and_gpu() -> None:
    cuda, trt, plan = _pair()
    other = SimTensorRT(cuda, "tensorrt", "10.14.1.48", trt.registry)
    logger = other.Logger()
    assert other.Runtime(logger).deserialize_cuda_engine(plan) is None
    assert "not compatible with this version" in logger.messages[-1][1]
    assert trt.Runtime(logger).deserialize_cuda_engine(b"garbage") is None


def test_backend_shared_context_capture_is_refused(engines: tuple[Path, dict], fixture_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug the simulator found: re-binding one context for the second graph of the pair."""
    import runtime.backends.tensorrt as trt_backend

    d, registry = engines
    cache: dict = {}

    def shared(self: object, eng: object, scratch: int, size: int) -> object:
        return cache.setdefault(id(eng), eng.engine.create_execution_context())  # type: ignore[attr-defined]

    monkeypatch.setattr(trt_backend.TrtBackend, "_graph_context", shared)
    cuda, trt = _sim(registry)
    with installed(cuda, trt):
        codec = Codec(d, defaults().with_(backend="trt"))
        with pytest.raises(SimulatorError, match="trt.context_after_capture"):
            codec.decode((fixture_dir / "stream.bin").read_bytes(), sampler="ddim", steps=4)
        codec.close()
    _tally(cuda)


def test_every_rule_was_exercised_and_the_count_is_printed(capsys: pytest.CaptureFixture) -> None:
    """Runs last in this module: prints how often each simulator rule was checked."""
    if not CHECKS:
        pytest.skip("no simulated decode ran (tensorrt_rtx missing)")
    with capsys.disabled():
        print(f"\nsimulator rule checks exercised by the TensorRT decode tests: {sum(CHECKS.values())}")
        for rule in sorted(RULES):
            print(f"  {rule:28s} {CHECKS.get(rule, 0):7d}  {RULES[rule]}")
    decode_rules = {"trt.enqueue_ready", "trt.input_shape", "trt.address", "trt.io_alias", "trt.capture_warmup",
                    "trt.capturable", "trt.context_after_capture", "trt.device_memory", "capture.unsafe_call",
                    "capture.sync", "graph.replay_exact", "device.bounds", "device.use_after_free", "stream.race",
                    "host.read_after_sync", "device.free_pending", "leak.free_all"}
    assert not [r for r in decode_rules if not CHECKS.get(r)], "rules the real decode never checked"
