"""TensorRT backend and engine builder: everything that can be checked without a GPU.

Pure helpers (compatibility rules, buffer planning, arenas, graph cache, sampler tables)
are tested directly; the FP16 conversion and the sampler-step graphs are checked with
ONNX Runtime on CPU; engines are AOT-built with TensorRT-RTX when it is importable.
The ``gpu`` tests run a whole decode on TensorRT and compare it with ONNX Runtime; they
skip (with the reason) without an NVIDIA GPU, tensorrt and cuda-python.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from runtime.backends.tensorrt import (
    Arena,
    EngineCompatError,
    GraphCache,
    GraphRecord,
    NonFiniteOutputError,
    STEP_COEF_KEYS,
    TensorIO,
    check_engine_compat,
    check_finite,
    normalize_cc,
    plan_buffers,
    profile_admits,
    step_table,
    trt_version_string,
)
from runtime.manifest import EngineEntry, load_manifest
from runtime.sampler import GaussianNoise, ReplayNoise, Schedule, make_sampler, run

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- compatibility


def _entry(**kw: object) -> EngineEntry:
    base = dict(network="control_unet", file="engines/control_unet.plan", sha256="0" * 64,
                trt_version="tensorrt-10.13.0.35", gpu="NVIDIA L4", compute_capability="8.9", precision="fp16")
    base.update(kw)
    return EngineEntry(**base)  # type: ignore[arg-type]


def test_compat_accepts_same_version_gpu_and_build_number_change() -> None:
    check_engine_compat(_entry(), "tensorrt-10.13.0.35", "NVIDIA L4", "89")
    check_engine_compat(_entry(), "tensorrt-10.13.0.99", "NVIDIA L4", "8.9")  # build number may differ


@pytest.mark.parametrize("runtime_version", ["tensorrt-10.12.0.36", "tensorrt-11.4.0.106", "tensorrt_rtx-10.13.0.35"])
def test_compat_refuses_other_trt_version_or_flavour(runtime_version: str) -> None:
    with pytest.raises(EngineCompatError, match="was built with tensorrt-10.13.0.35.*rebuild"):
        check_engine_compat(_entry(), runtime_version, "NVIDIA L4", "8.9")


def test_compat_refuses_other_compute_capability() -> None:
    with pytest.raises(EngineCompatError, match="compute capability 8.9.*is 9.0"):
        check_engine_compat(_entry(), "tensorrt-10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


def test_compat_refuses_other_gpu_model_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(EngineCompatError, match="built on 'NVIDIA L4'.*'NVIDIA GeForce RTX 4090'"):
        check_engine_compat(_entry(), "tensorrt-10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9")
    check_engine_compat(_entry(), "tensorrt-10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9", allow_other_gpu=True)
    assert "rebuild the engines on this GPU" in caplog.text


def test_compat_aot_engine_runs_on_any_gpu_of_its_capability() -> None:
    e = _entry(trt_version="tensorrt_rtx-1.7.1.116", gpu="AOT:8.9")
    check_engine_compat(e, "tensorrt_rtx-1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(EngineCompatError, match="compute capability"):
        check_engine_compat(e, "tensorrt_rtx-1.7.1.116", "NVIDIA GeForce RTX 5090", "12.0")


def test_compat_refuses_engine_of_another_model() -> None:
    check_engine_compat(_entry(), "tensorrt-10.13.0.35", "NVIDIA L4", "8.9", "ab" * 32, "ab" * 32)
    with pytest.raises(EngineCompatError, match="fingerprint.*stale"):
        check_engine_compat(_entry(), "tensorrt-10.13.0.35", "NVIDIA L4", "8.9", "ab" * 32, "cd" * 32)


def test_version_and_cc_normalisation() -> None:
    assert trt_version_string("tensorrt", "10.1.0") == "tensorrt-10.1.0"
    assert normalize_cc("89") == normalize_cc("sm_89") == normalize_cc("SM89") == normalize_cc((8, 9)) == "8.9"
    assert normalize_cc("120") == normalize_cc("12.0") == "12.0"
    with pytest.raises(ValueError):
        normalize_cc("eighty")
    with pytest.raises(EngineCompatError, match="unrecognised"):
        check_engine_compat(_entry(trt_version="garbage"), "tensorrt-10.13.0.35", "NVIDIA L4", "8.9")


# --------------------------------------------------------------------------- buffer planning

IO = (
    TensorIO("x_t", "float32", (1, 4, -1, -1), True),
    TensorIO("t", "float32", (1,), True),
    TensorIO("eps", "float16", (1, 4, -1, -1), False),
    TensorIO("idx", "int32", (1,), True),
)


def test_plan_buffers_sizes_offsets_alignment() -> None:
    plan = plan_buffers(IO, {"x_t": (1, 4, 8, 12), "t": (1,), "eps": (1, 4, 8, 12), "idx": (1,)})
    assert plan.sizes == {"x_t": 4 * 8 * 12 * 4, "t": 4, "eps": 4 * 8 * 12 * 2, "idx": 4}
    assert plan.offsets["x_t"] == 0
    assert all(o % 256 == 0 for o in plan.offsets.values())
    spans = sorted((plan.offsets[k], plan.offsets[k] + plan.sizes[k]) for k in plan.sizes)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # no overlap
    assert plan.total == spans[-1][0] + 256 and plan.total % 256 == 0


def test_plan_buffers_zero_size_tensor_gets_its_own_slot() -> None:
    plan = plan_buffers(IO[:2], {"x_t": (1, 4, 0, 8), "t": (1,)}, alignment=16)
    assert plan.sizes["x_t"] == 0 and plan.offsets["t"] == 16


@pytest.mark.parametrize("shapes, match", [
    ({"x_t": (1, 4, 8, 8), "t": (1,), "eps": (1, 4, 8, 8)}, "no shape given for tensor 'idx'"),
    ({"x_t": (1, 4, 8), "t": (1,), "eps": (1, 4, 8, 8), "idx": (1,)}, "rank"),
    ({"x_t": (1, 3, 8, 8), "t": (1,), "eps": (1, 4, 8, 8), "idx": (1,)}, "static shape"),
    ({"x_t": (1, 4, -1, 8), "t": (1,), "eps": (1, 4, 8, 8), "idx": (1,)}, "unresolved"),
])
def test_plan_buffers_rejects_bad_shapes(shapes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_buffers(IO, shapes)


def test_plan_buffers_checks_the_profile() -> None:
    profile = {"x_t": ((1, 4, 1, 1), (1, 4, 64, 96), (1, 4, 256, 256)), "t": ((1,), (1,), (1,))}
    ok = {"x_t": (1, 4, 256, 8), "t": (1,), "eps": (1, 4, 256, 8), "idx": (1,)}
    plan_buffers(IO, ok, profile)
    with pytest.raises(ValueError, match="outside the engine profile.*--max"):
        plan_buffers(IO, {**ok, "x_t": (1, 4, 257, 8)}, profile)
    with pytest.raises(ValueError, match="power of two"):
        plan_buffers(IO, ok, alignment=48)


def test_profile_admits_selects_static_engines_from_the_manifest() -> None:
    from runtime.manifest import TensorSpec

    inputs = (TensorSpec("x_t", "float32", (1, 4, "h8", "w8")), TensorSpec("r", "float32", (1, 8, "h8/2", "w8/2")),
              TensorSpec("t", "float32", (1,)))
    static = {"h8": (16, 16, 16), "w8": (24, 24, 24)}
    assert profile_admits(static, inputs, {"x_t": (1, 4, 16, 24), "r": (1, 8, 8, 12), "t": (1,)})
    assert not profile_admits(static, inputs, {"x_t": (1, 4, 16, 32)})
    assert not profile_admits(static, inputs, {"r": (1, 8, 9, 12)})
    assert not profile_admits(static, inputs, {"t": (2,)})
    assert not profile_admits(static, inputs, {"x_t": (1, 4, 16)})
    assert profile_admits({"h8": (8, 64, 256), "w8": (8, 64, 256)}, inputs, {"x_t": (1, 4, 8, 256)})


class FakeDevice:
    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.next = 0x1000

    def alloc(self, n: int) -> int:
        ptr, self.next = self.next, self.next + n + 4096
        self.live[ptr] = n
        return ptr

    def free(self, ptr: int) -> None:
        assert ptr in self.live, "double free"
        del self.live[ptr]


def test_arena_reuses_for_same_or_smaller_sizes_grows_and_frees() -> None:
    dev = FakeDevice()
    arena = Arena(dev.alloc, dev.free)
    small = plan_buffers(IO, {"x_t": (1, 4, 64, 64), "t": (1,), "eps": (1, 4, 64, 64), "idx": (1,)})
    big = plan_buffers(IO, {"x_t": (1, 4, 512, 512), "t": (1,), "eps": (1, 4, 512, 512), "idx": (1,)})
    a1 = arena.addresses(small)
    a2 = arena.addresses(small)  # same-size image: same buffers, no allocation
    assert a1 == a2 and arena.allocations == 1 and len(dev.live) == 1
    arena.addresses(big)
    assert arena.allocations == 2 and len(dev.live) == 1  # old freed before the new one
    assert arena.capacity >= big.total and arena.capacity % Arena.GRANULE == 0
    arena.addresses(small)  # shrinking never reallocates
    assert arena.allocations == 2
    arena.release()
    arena.release()  # idempotent
    assert dev.live == {}


# --------------------------------------------------------------------------- graph cache


class FakeExecutor:
    """Counts captures, launches and destroys the way TrtBackend's CUDA calls would."""

    def __init__(self) -> None:
        self.captured: list[tuple] = []
        self.launched: list[object] = []
        self.destroyed: list[object] = []

    def capture(self, key: tuple) -> GraphRecord:
        self.captured.append(key)
        return GraphRecord(graph=("graph", key), resources={"buffers": f"bufs{len(self.captured)}"})

    def destroy(self, rec: GraphRecord) -> None:
        self.destroyed.append(rec.graph)


def test_graph_cache_captures_once_per_shape_and_replays() -> None:
    ex = FakeExecutor()
    cache = GraphCache(ex.destroy, max_entries=2)
    k64 = GraphCache.key("denoise", {"x": (1, 4, 8, 8)}, "ddpm", 50)
    assert k64 == GraphCache.key("denoise", {"x": [1, 4, 8, 8]}, "ddpm", 50)  # lists and tuples alike
    for _image in range(3):  # three same-size images: one capture, 3 x 50 replays
        rec = cache.get(k64, lambda: ex.capture(k64))
        for _ in range(50):
            cache.replay(k64, ex.launched.append)
    assert ex.captured == [k64] and cache.captures == 1 and cache.hits == 2
    assert rec.replays == 150 and len(ex.launched) == 150 and ex.launched[0] == ("graph", k64)
    assert ex.destroyed == []


def test_graph_cache_evicts_least_recently_used_and_clears() -> None:
    ex = FakeExecutor()
    cache = GraphCache(ex.destroy, max_entries=2)
    keys = [GraphCache.key("denoise", {"x": (1, 4, s, s)}) for s in (8, 16, 32)]
    cache.get(keys[0], lambda: ex.capture(keys[0]))
    cache.get(keys[1], lambda: ex.capture(keys[1]))
    cache.get(keys[0], lambda: ex.capture(keys[0]))  # touch 0: 1 becomes the oldest
    cache.get(keys[2], lambda: ex.capture(keys[2]))
    assert ex.destroyed == [("graph", keys[1])] and keys[1] not in cache and len(cache) == 2
    with pytest.raises(KeyError):
        cache.replay(keys[1], ex.launched.append)
    cache.clear()
    assert len(cache) == 0 and sorted(map(str, ex.destroyed)) == sorted(map(str, [("graph", k) for k in keys]))
    with pytest.raises(ValueError):
        GraphCache(ex.destroy, max_entries=0)


# --------------------------------------------------------------------------- sampler tables / finiteness


@pytest.mark.parametrize("name, steps", [("ddpm", 7), ("ddim", 10)])
def test_step_table_matches_sampler_coefficients(name: str, steps: int) -> None:
    sampler = make_sampler(name, steps, Schedule())
    coefs, t = step_table(sampler)
    n = len(sampler.timesteps)
    assert coefs.shape == (n, len(STEP_COEF_KEYS[name])) and coefs.dtype == np.float32
    np.testing.assert_array_equal(t, sampler.timesteps.astype(np.float32))
    for i in range(n):
        c = sampler.coefficients(i)
        for j, k in enumerate(STEP_COEF_KEYS[name]):
            want = np.float32(c["noise_mask"]) * np.float32(c["sqrt_variance"]) if k == "noise_scale" else c[k]
            assert coefs[i, j] == np.float32(want), (i, k)
    if name == "ddpm":
        assert coefs[-1, 4] == 0.0  # the last step adds no noise


def test_check_finite_names_the_remedy() -> None:
    check_finite("vae_decoder", "decoded", np.zeros((1, 3, 2, 2), np.float32), "fp16")
    bad = np.array([0.0, np.inf, np.nan], np.float32)
    with pytest.raises(NonFiniteOutputError, match="2 non-finite.*FP32.*--backend ort"):
        check_finite("vae_decoder", "decoded", bad, "fp16")
    check_finite("x", "idx", np.array([1, 2], np.int32), "fp16")  # integers are always finite


def test_module_imports_without_tensorrt_or_cuda() -> None:
    import runtime.backends.tensorrt as m

    assert m.TrtBackend.name == "trt"
    assert "tensorrt" not in dir(m) and "cudart" not in dir(m)


# --------------------------------------------------------------------------- ONNX: sampler step, FP16

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from export.build_engines import (  # noqa: E402
    convert_to_fp16,
    dim_range,
    fp16_allowed,
    input_profiles,
    record_engine,
    sampler_step_model,
)


def _session(model: "onnx.ModelProto") -> "ort.InferenceSession":
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusions: exact op order
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name, steps", [("ddpm", 6), ("ddim", 5)])
def test_sampler_step_graph_reproduces_the_numpy_sampler(name: str, steps: int) -> None:
    """The graph the CUDA-graph loop replays, driven by index like the device loop, equals runtime.sampler."""
    sampler = make_sampler(name, steps, Schedule())
    shape = (1, 4, 6, 10)
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal(shape, dtype=np.float32)
    eps_by_t = {int(t): rng.standard_normal(shape, dtype=np.float32) for t in sampler.timesteps}
    n = len(sampler.timesteps)
    noise = rng.standard_normal((n,) + shape, dtype=np.float32) if sampler.needs_noise() else None

    def model_fn(x: np.ndarray, t: int) -> np.ndarray:
        return eps_by_t[t]

    want = run(sampler, x_T, model_fn, ReplayNoise(x_T, noise))
    sess = _session(sampler_step_model(name, 4))
    coefs, t_table = step_table(sampler)
    x, idx, t = x_T, np.zeros(1, np.int32), t_table[:1]
    for i in range(n):
        assert int(t[0]) == int(sampler.timesteps[i])  # t comes from the previous step's t_next
        feeds = {"x": x, "eps": model_fn(x, int(t[0])), "idx": idx, "coefs": coefs, "t_table": t_table}
        if noise is not None:
            feeds["noise"] = noise  # (n, 1, C, h, w), as the backend uploads it
        x, idx, t = sess.run(["x_next", "idx_next", "t_next"], feeds)
    assert int(idx[0]) == n
    np.testing.assert_array_equal(x, want)


class _TinyUNetLike(torch.nn.Module):
    """Conv + GroupNorm + attention + upsampling + a sinusoidal timestep embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.temb = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.SiLU(), torch.nn.Linear(16, 16))
        self.qkv = torch.nn.Linear(16, 48)
        self.conv_out = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        half = 8
        freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.temb(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        h = torch.nn.functional.silu(self.norm(self.conv_in(x))) + emb[:, :, None, None]
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        h = h + a.transpose(1, 2).reshape(b, c, hh, ww)
        h = torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.conv_out(h)


def _export_tiny(path: Path) -> Path:
    torch.manual_seed(0)
    model = _TinyUNetLike().eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([981.0])
    torch.onnx.export(model, (x, t), str(path), input_names=["x_t", "t"], output_names=["eps"],
                      dynamic_axes={"x_t": {2: "h8", 3: "w8"}, "eps": {2: "H", 3: "W"}}, opset_version=17,
                      dynamo=False)
    return path


def test_fp16_conversion_is_valid_and_close_to_fp32(tmp_path: Path) -> None:
    path = _export_tiny(tmp_path / "tiny.onnx")
    fp32 = onnx.load(str(path))
    half = convert_to_fp16(fp32)
    onnx.checker.check_model(half, full_check=True)
    # I/O stays float32; weights are float16; the timestep path stays float32.
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [onnx.TensorProto.FLOAT] * 2
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [onnx.TensorProto.FLOAT]
    conv_weights = {t.data_type for t in half.graph.initializer if len(t.dims) == 4}
    assert conv_weights == {onnx.TensorProto.FLOAT16}
    assert onnx.TensorProto.FLOAT in {t.data_type for t in half.graph.initializer if len(t.dims) == 2}  # time MLP
    sin_cos = [n for n in half.graph.node if n.op_type in ("Sin", "Cos")]
    assert sin_cos and all("fp32" not in i and "fp16" not in i for n in sin_cos for i in n.input)
    rng = np.random.default_rng(0)
    for h, w in ((8, 8), (16, 24)):
        x = rng.standard_normal((1, 4, h, w), dtype=np.float32)
        for t in (1.0, 981.0):
            feeds = {"x_t": x, "t": np.array([t], np.float32)}
            (ref,) = _session(fp32).run(None, feeds)
            (got,) = _session(half).run(None, feeds)
            assert got.dtype == np.float32 and got.shape == ref.shape
            err = np.abs(got - ref).max() / (np.abs(ref).max() + 1e-6)
            assert err < 1e-2, f"fp16 relative error {err} at {h}x{w}, t={t}"


def test_fp16_policy_and_profiles() -> None:
    assert fp16_allowed("control_unet") and fp16_allowed("vae_decoder") and fp16_allowed("content_decoder")
    for n in ("hyper_decoder", "ctx_anchor_0", "ctx_nonanchor_3", "image_encoder", "sampler_step_ddpm"):
        assert not fp16_allowed(n)
    assert not fp16_allowed("control_unet", {"fp16_safe": False})  # the manifest's word wins
    axes = {"h8": (8, 64, 256), "w8": (8, 96, 256)}
    assert dim_range("h8/2", axes) == (4, 32, 128) and dim_range(4, axes) == (4, 4, 4)
    with pytest.raises(ValueError, match="no known axis"):
        dim_range("h3", axes)
    prof = input_profiles([("x_t", (1, 4, "h8", "w8")), ("t", (1,))], axes)
    assert prof == {"x_t": ((1, 4, 8, 8), (1, 4, 64, 96), (1, 4, 256, 256)), "t": ((1,), (1,), (1,))}


def _mini_artifacts(tmp: Path) -> Path:
    """A minimal artifact directory: the tiny graph as `control_unet` and a manifest."""
    from runtime.manifest import FORMAT_VERSION, sha256_file

    d = tmp / "art"
    d.mkdir()
    _export_tiny(d / "control_unet.onnx")
    (d / "tables.npz").write_bytes(b"x")
    raw = {
        "format_version": FORMAT_VERSION, "fingerprint": "ab" * 32, "model": {"latent_channels": 4},
        "networks": {"control_unet": {
            "name": "control_unet", "file": "control_unet.onnx", "sha256": sha256_file(d / "control_unet.onnx"),
            "inputs": [{"name": "x_t", "dtype": "float32", "shape": [1, 4, "h8", "w8"]},
                       {"name": "t", "dtype": "float32", "shape": [1]}],
            "outputs": [{"name": "eps", "dtype": "float32", "shape": [1, 4, "H", "W"]}],
            "profile": {"h8": [8, 16, 32], "w8": [8, 16, 32]}}},
        "tables_file": "tables.npz", "tables_sha256": sha256_file(d / "tables.npz"), "opset": 17,
        "versions": {"onnx": onnx.__version__},
    }
    (d / "manifest.json").write_text(json.dumps(raw))
    return d


def test_record_engine_updates_the_manifest_atomically(tmp_path: Path) -> None:
    d = _mini_artifacts(tmp_path)
    e = EngineEntry("control_unet", "engines/control_unet.plan", "1" * 64, "tensorrt_rtx-1.7.1.116", "AOT:8.9",
                    "8.9", "fp16", {"h8": (8, 16, 32)})
    record_engine(d, "control_unet", e, {"fingerprint": "ab" * 32})
    m, _ = load_manifest(d)
    assert m.engines["control_unet"] == e
    assert json.loads((d / "manifest.json").read_text())["engines"]["control_unet"]["fingerprint"] == "ab" * 32
    assert m.networks["control_unet"].file == "control_unet.onnx"  # the rest is untouched
    from runtime.manifest import ManifestError

    with pytest.raises(ManifestError, match="malformed"):
        record_engine(d, "bad", replace(e, file="engines/bad.plan"), {"profile": {"h8": 5}})  # refused, not written
    assert load_manifest(d)[0].engines.keys() == {"control_unet"}
    assert not list(d.glob(".manifest.json.*"))  # no temporary left behind


# --------------------------------------------------------------------------- AOT builds (tensorrt_rtx)

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx)")


@needs_rtx
def test_aot_build_small_graphs_fp32_fp16_static_and_sampler_steps(tmp_path: Path) -> None:
    from export.build_engines import build_all
    from runtime.manifest import verify_file

    d = _mini_artifacts(tmp_path)
    built = build_all(d, ["control_unet", "sampler_step_ddpm", "sampler_step_ddim"], fp16=True,
                      static_hw=[(128, 192)], builder="tensorrt_rtx", compute_capability="89")
    assert set(built) == {"control_unet", "control_unet@128x192", "sampler_step_ddpm", "sampler_step_ddpm@128x192",
                          "sampler_step_ddim", "sampler_step_ddim@128x192"}
    m, _ = load_manifest(d)
    raw = json.loads((d / "manifest.json").read_text())["engines"]
    for key, e in built.items():
        assert m.engines[key] == e
        assert e.gpu == "AOT:8.9" and e.compute_capability == "8.9" and e.trt_version.startswith("tensorrt_rtx-")
        verify_file(d, e.file, e.sha256, key)
        assert raw[key]["fingerprint"] == "ab" * 32 and raw[key]["builder"] == "tensorrt_rtx"
    assert built["control_unet"].precision == "fp16" and built["sampler_step_ddpm"].precision == "fp32"
    assert built["control_unet"].profile == {"h8": (8, 16, 32), "w8": (8, 16, 32)}
    assert built["control_unet@128x192"].static_shape and built["control_unet@128x192"].profile["h8"] == (16, 16, 16)
    assert built["sampler_step_ddim"].profile["n"] == (1, 50, 1000)
    # The recorded engines pass the runtime's compatibility rules for an RTX runtime on an SM 8.9 GPU.
    for key, e in m.engines.items():
        check_engine_compat(e, e.trt_version, "NVIDIA GeForce RTX 4090", "8.9", m.fingerprint, raw[key]["fingerprint"])


@needs_rtx
def test_rtx_build_retries_without_user_allocation_when_the_flagged_build_fails(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """TensorRT-RTX with REQUIRE_USER_ALLOCATION plans the largest profile's memory up
    front; at a 2048x2048 UNet profile that build failed here (a 64 GiB request). The
    builder must then rebuild without the flag, say so, and record the flags it used."""
    from export.build_engines import EngineBuilder

    d = _mini_artifacts(tmp_path)
    eb = EngineBuilder("tensorrt_rtx", "89")
    prof = {"x_t": ((1, 4, 8, 8), (1, 4, 16, 16), (1, 4, 32, 32))}
    plan = eb.build(d / "control_unet.onnx", prof)
    assert plan and eb.last_build_flags == {"REQUIRE_USER_ALLOCATION"}  # the normal case: capturable

    real, seen = eb.builder, []

    class FailsWithFlag:  # the real builder, except that a flagged build fails as the OOM one did
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def build_serialized_network(self, network: object, config: object) -> object:
            flagged = config.get_flag(eb.trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
            seen.append(flagged)
            return None if flagged else real.build_serialized_network(network, config)

    eb.builder = FailsWithFlag()
    with caplog.at_level(logging.WARNING, logger="export.build_engines"):
        retried = eb.build(d / "control_unet.onnx", prof)
    assert seen == [True, False]
    assert retried[:4] == plan[:4] and len(retried) > 1000  # a real serialized plan, not a placeholder
    assert eb.last_build_flags == frozenset()
    assert "rebuilding without it" in caplog.text and "not be CUDA-graph capturable" in caplog.text

    class AlwaysFails(FailsWithFlag):
        def build_serialized_network(self, network: object, config: object) -> object:
            return None

    eb.builder = AlwaysFails()
    with pytest.raises(RuntimeError, match="failed to build control_unet.onnx"):
        eb.build(d / "control_unet.onnx", prof)


@needs_rtx
def test_build_engines_cli_errors_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from export.build_engines import main

    d = _mini_artifacts(tmp_path)
    assert main([str(d), "--networks", "nope", "--builder", "tensorrt_rtx", "--compute-capability", "89"]) == 1
    assert "not in the artifacts" in capsys.readouterr().err
    assert main([str(d), "--networks", "control_unet", "--builder", "tensorrt_rtx", "--compute-capability", "90"]) == 1
    assert "cannot target SM90" in capsys.readouterr().err


def _tiny_export(tmp: Path) -> Path:
    if not (REPO / "export" / "__main__.py").is_file():
        pytest.skip("export/__main__.py is not available yet")
    from export.__main__ import export_artifacts

    return export_artifacts(tmp / "tiny", config="tiny", random_init=True, seed=0)


@needs_rtx
def test_aot_build_every_graph_of_a_tiny_export(tmp_path: Path, fixture_artifacts: Path) -> None:
    """CPU-only AOT build (tensorrt_rtx, SM89) of every graph of the session's tiny export."""
    import shutil

    from export.build_engines import build_all

    d = Path(shutil.copytree(fixture_artifacts, tmp_path / "tiny"))
    m0, _ = load_manifest(d)
    nets = sorted(m0.networks) + ["sampler_step_ddpm", "sampler_step_ddim"]
    built = build_all(d, nets, fp16=True, builder="tensorrt_rtx", compute_capability="89")
    m, _ = load_manifest(d)
    assert set(m.engines) == set(nets) == set(built)
    for n, e in m.engines.items():
        want = "fp16" if n in ("control_unet", "control", "unet", "vae_decoder", "content_decoder") else "fp32"
        assert e.precision == want, n
    # The FP16 graphs the engines were built from agree with FP32 (ONNX Runtime, CPU).
    rng = np.random.default_rng(0)
    sizes = {"h8": 8, "w8": 12, "h16": 4, "w16": 6, "h64": 1, "w64": 2, "H": 64, "W": 96}
    for n in ("control_unet", "vae_decoder", "content_decoder"):
        entry = m.networks[n]
        fp32 = onnx.load(str(d / entry.file))
        feeds = {t.name: (np.array([500.0], np.float32) if t.name == "t" else rng.standard_normal(
            [s if isinstance(s, int) else sizes[s] for s in t.shape]).astype(np.float32)) for t in entry.inputs}
        ref = _session(fp32).run(None, feeds)
        got = _session(convert_to_fp16(fp32)).run(None, feeds)
        for a, b in zip(ref, got):
            assert np.abs(a - b).max() / (np.abs(a).max() + 1e-6) < 1e-2, n


# --------------------------------------------------------------------------- GPU: whole decode vs ORT


def _gpu_reason() -> str | None:
    for mod in ("tensorrt", "cuda"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'diffeic-runtime[gpu]')"
    try:
        from runtime.backends.tensorrt import _Cuda

        _Cuda().device()
    except Exception as exc:  # no driver or no device
        return f"no usable CUDA GPU: {exc}"
    return None


@pytest.fixture(scope="module")
def gpu_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    from export.build_engines import build_all

    d = _tiny_export(tmp_path_factory.mktemp("gpu"))
    build_all(d, None, fp16=False, builder="tensorrt")
    return d


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_gpu_decode_trt_matches_ort(gpu_artifacts: Path, sampler: str) -> None:
    from runtime.config import defaults
    from runtime.pipeline import Codec

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    ort_codec = Codec(gpu_artifacts, defaults().with_(backend="ort", sampler=sampler, steps=8))
    trt_codec = Codec(gpu_artifacts, defaults().with_(backend="trt", sampler=sampler, steps=8))
    try:
        data = ort_codec.encode(image).data
        a = ort_codec.decode(data)
        b = trt_codec.decode(data, noise=GaussianNoise(ort_codec.cfg.seed))
        b2 = trt_codec.decode(data)  # same size again: graph replayed, not recaptured
        assert trt_codec.backend._graphs.captures == 1  # type: ignore[attr-defined]
        np.testing.assert_array_equal(b.image, b2.image)
        assert np.abs(a.c_latent - b.c_latent).max() < 1e-3
        assert np.abs(a.samples - b.samples).max() < 5e-2
        assert _psnr(a.image, b.image) > 35.0
    finally:
        ort_codec.close()
        trt_codec.close()
