"""Build TensorRT engines from an exported artifact directory and record them in its manifest.

    python -m export.build_engines ARTIFACT_DIR [--fp16] [--min H W] [--opt H W] [--max H W]
        [--static H W] [--tile PX] [--timing-cache FILE] [--networks ...] [--builder auto|tensorrt|tensorrt_rtx]
        [--compute-capability 89]

This module owns the engine build: choosing the precision per network, the FP16 ONNX
conversion (TensorRT is used strongly typed, so FP16 comes from an FP16 graph), the
optimization profiles (pixel sizes converted per axis family, see
``export.specs.AXIS_FACTORS``), the generated ``sampler_step_<kind>`` graphs that the
runtime's CUDA-graph denoising loop needs, timing-cache load/save and the atomic update
of ``manifest.json`` (one engine record per built plan, with TensorRT version, GPU,
compute capability, precision, profile, sha256, and the model fingerprint).

Precision: the entropy-parsing networks (hyper decoder, context model) and the image
encoder (its ``y`` is entropy-coded directly) are never FP16 (``fp16_safe=False`` in
``export/specs.py``); the parsing networks are only built when asked for by
``--networks`` and then in strict FP32 (TF32 off).

Builders: ``tensorrt`` (needs a GPU; the engine is tuned for that GPU) or
``tensorrt_rtx`` (TensorRT for RTX; builds ahead of time without a GPU for a chosen
compute capability, recorded as gpu ``"AOT:<cc>"``; timing caches are no-ops there).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.engines import (
    SAMPLER_STEP_PREFIX,
    STEP_COEF_KEYS,
    engine_io_names,
    import_tensorrt,
    normalize_cc,
    trt_version_string,
)
from runtime.manifest import MANIFEST_NAME, EngineEntry, Manifest, load_manifest, sha256_file

from .specs import PixelProfile

log = logging.getLogger(__name__)

DEFAULT_NETWORKS = ("control_unet", "vae_decoder", "content_decoder", "image_encoder", "vae_encoder", "lfgcm_analysis",
                    SAMPLER_STEP_PREFIX + "ddpm", SAMPLER_STEP_PREFIX + "ddim", SAMPLER_STEP_PREFIX + "dpmpp")
MAX_STEPS = 1000  # upper bound of the step-table axis of the sampler-step engines
TILED_NETWORKS = ("vae_decoder", "vae_encoder")  # what runtime.tiling runs tile by tile
FP16_MAX = 65504.0

# Ops kept in FP32 inside an FP16 graph: the sinusoidal timestep embedding (angles up to
# ~1000 rad lose whole radians in FP16).
FP32_OPS = frozenset({"Sin", "Cos"})
# Inputs that keep their own type whatever the node's precision (ONNX requires float32 there).
_TYPE_EXEMPT_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


def fp16_allowed(network: str, manifest_record: Mapping[str, Any] | None = None) -> bool:
    """Whether ``network`` may be built in FP16 (see the module docstring)."""
    if manifest_record is not None and "fp16_safe" in manifest_record:
        return bool(manifest_record["fp16_safe"])
    if network.startswith(SAMPLER_STEP_PREFIX):
        return False  # the latent accumulates over every step: keep the update exact FP32
    return not (network in ("hyper_decoder", "image_encoder", "vae_encoder", "lfgcm_analysis")
                or network.startswith("ctx_"))


def is_parsing_network(network: str) -> bool:
    return network == "hyper_decoder" or network.startswith("ctx_")


# --------------------------------------------------------------------------- FP16 conversion


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, by shape inference on a weightless copy (no 2 GiB limit)."""
    light = _strip_weights(model)
    g = light.graph
    inits = list(g.initializer)
    del g.initializer[:]
    for t in inits:  # initializers become typed inputs: types survive, weights do not
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(light)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("external_data")
        t.data_location = TensorProto.DEFAULT
    return m


def convert_to_fp16(model: onnx.ModelProto, keep_fp32_inputs: Iterable[str] | None = None,
                    fp32_ops: Iterable[str] = FP32_OPS) -> onnx.ModelProto:
    """An FP16 copy of an FP32 graph with the same FP32 inputs and outputs.

    Float inputs are cast to FP16 on entry and float outputs back to FP32, so the engine's
    I/O (and the runtime's buffers) stay FP32. Float32 initializers consumed by FP16 nodes
    are converted (clipped to the FP16 range). Inputs of rank <= 1 (the timestep ``t``) and
    ``keep_fp32_inputs`` stay FP32, and so does everything computed from them alone (the
    timestep-embedding MLP) until it meets an FP16 activation; ``fp32_ops`` always run in
    FP32. Sub-graphs (If/Loop) are left untouched and run in FP32.
    """
    types = _elem_types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    fp32_ops = frozenset(fp32_ops)
    keep = set(keep_fp32_inputs or ())
    inits = {t.name: t for t in g.initializer}
    # Constant nodes with float values become initializers, so constants have one form.
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value" \
                and node.attribute[0].t.data_type == TensorProto.FLOAT:
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            nodes.append(node)

    region: dict[str, str] = {}  # float tensor -> "16" | "32" | "c" (constant-derived)
    new_nodes: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}  # fp16 input name -> its cast
    cast_cache: dict[tuple[str, int], str] = {}
    fp16_inits: dict[str, str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in cast_cache:
            new = f"{name}__to_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [new], to=to, name=f"{new}__cast"))
            cast_cache[key] = new
        return cast_cache[key]

    def fp16_init(name: str) -> str:
        if name not in fp16_inits:
            arr = numpy_helper.to_array(inits[name])
            new = f"{name}__fp16"
            g.initializer.append(numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), new))
            fp16_inits[name] = new
        return fp16_inits[name]

    for inp in g.input:
        if inp.name in inits or types.get(inp.name) != TensorProto.FLOAT:
            continue
        rank = len(inp.type.tensor_type.shape.dim)
        if rank <= 1 or inp.name in keep:
            region[inp.name] = "32"
        else:
            renamed[inp.name] = cast(inp.name, TensorProto.FLOAT16)
            region[renamed[inp.name]] = "16"
    for name, t in inits.items():
        if t.data_type == TensorProto.FLOAT:
            region[name] = "c"

    for node in nodes:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        exempt = _TYPE_EXEMPT_INPUTS.get(node.op_type, set())
        float_in = [(k, n) for k, n in enumerate(node.input) if n and n in region and k not in exempt]
        kinds = {region[n] for _, n in float_in}
        half = "16" in kinds and node.op_type not in fp32_ops and not has_subgraph
        for k, name in float_in:
            r = region[name]
            if half and r == "32":
                node.input[k] = cast(name, TensorProto.FLOAT16)
            elif half and r == "c":
                node.input[k] = fp16_init(name) if name in inits else cast(name, TensorProto.FLOAT16)
            elif not half and r == "16":
                node.input[k] = cast(name, TensorProto.FLOAT)
        if half:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
        out_region = "16" if half else ("32" if kinds & {"16", "32"} else "c")
        for o in node.output:
            if types.get(o) == TensorProto.FLOAT:
                region[o] = out_region
        new_nodes.append(node)

    # Graph outputs produced in FP16 are renamed internally and cast back to FP32.
    for o in g.output:
        if region.get(o.name) == "16":
            internal = f"{o.name}__fp16"
            for node in new_nodes:
                for k, n in enumerate(node.output):
                    if n == o.name:
                        node.output[k] = internal
                for k, n in enumerate(node.input):
                    if n == o.name:
                        node.input[k] = internal
            new_nodes.append(helper.make_node("Cast", [internal], [o.name], to=TensorProto.FLOAT,
                                              name=f"{o.name}__out_cast"))

    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale types; consumers re-infer
    used = {n for node in g.node for n in node.input}
    keep_inits = [t for t in g.initializer if t.name in used or t.name in {o.name for o in g.output}]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    return out


# --------------------------------------------------------------------------- sampler-step graphs


def sampler_step_model(kind: str, latent_channels: int, opset: int = 17) -> onnx.ModelProto:
    """The ONNX graph of one sampler update, reading its step's data from tables by index.

    Inputs: x, eps (1, C, h8, w8); idx int32 (1,); coefs (n, K) in the column order of
    ``runtime.backends.tensorrt.STEP_COEF_KEYS[kind]``; t_table (n,); DDPM also noise
    (n, 1, C, h8, w8); DPM-Solver++ also m_prev (the previous data prediction). Outputs:
    x_next, idx_next = idx + 1, t_next = t_table[min(idx+1, n-1)], DPM-Solver++ also m_next.
    The arithmetic is runtime.sampler's, in the same operation order.
    """
    if kind not in STEP_COEF_KEYS:
        raise ValueError(f"unknown sampler kind {kind!r}")
    K = len(STEP_COEF_KEYS[kind])
    C = int(latent_channels)
    F = TensorProto.FLOAT
    x_shape = [1, C, "h8", "w8"]
    in_names, out_names = engine_io_names(kind)
    vi = {
        "x": helper.make_tensor_value_info("x", F, x_shape),
        "eps": helper.make_tensor_value_info("eps", F, x_shape),
        "idx": helper.make_tensor_value_info("idx", TensorProto.INT32, [1]),
        "coefs": helper.make_tensor_value_info("coefs", F, ["n", K]),
        "t_table": helper.make_tensor_value_info("t_table", F, ["n"]),
        "noise": helper.make_tensor_value_info("noise", F, ["n", 1, C, "h8", "w8"]),
        "m_prev": helper.make_tensor_value_info("m_prev", F, x_shape),
    }
    outputs = [helper.make_tensor_value_info("x_next", F, x_shape),
               helper.make_tensor_value_info("idx_next", TensorProto.INT32, [1]),
               helper.make_tensor_value_info("t_next", F, [1])]
    if kind == "dpmpp":
        outputs.append(helper.make_tensor_value_info("m_next", F, x_shape))
    inits = [numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "scalar_shape"),
             numpy_helper.from_array(np.array([1], np.int32), "one_i32")]
    nodes = [helper.make_node("Gather", ["coefs", "idx"], ["row"], axis=0)]  # (1, K)
    for k in range(K):
        inits.append(numpy_helper.from_array(np.array(k, np.int64), f"col{k}"))
        nodes.append(helper.make_node("Gather", ["row", f"col{k}"], [f"k{k}_"], axis=1))  # (1,)
        nodes.append(helper.make_node("Reshape", [f"k{k}_", "scalar_shape"], [f"k{k}"]))
    mk = helper.make_node
    if kind == "ddpm":
        nodes += [
            mk("Mul", ["k0", "x"], ["a0"]), mk("Mul", ["k1", "eps"], ["a1"]), mk("Sub", ["a0", "a1"], ["pred_x0"]),
            mk("Mul", ["k2", "pred_x0"], ["b0"]), mk("Mul", ["k3", "x"], ["b1"]), mk("Add", ["b0", "b1"], ["mean"]),
            mk("Gather", ["noise", "idx"], ["noise_i5"], axis=0),  # (1, 1, C, h, w)
            mk("Squeeze", ["noise_i5", "axis0"], ["noise_i"]),
            mk("Mul", ["k4", "noise_i"], ["scaled"]), mk("Add", ["mean", "scaled"], ["x_next"]),
        ]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    elif kind == "ddim":
        nodes += [
            mk("Mul", ["k0", "eps"], ["a1"]), mk("Sub", ["x", "a1"], ["num"]), mk("Div", ["num", "k1"], ["pred_x0"]),
            mk("Mul", ["k2", "pred_x0"], ["b0"]), mk("Mul", ["k3", "eps"], ["b1"]), mk("Add", ["b0", "b1"], ["x_next"]),
        ]
    else:  # dpmpp: k0 sigma, k1 alpha, k2 c_x, k3 a, k4 half_a, k5 inv_r
        nodes += [
            mk("Mul", ["k0", "eps"], ["se"]), mk("Sub", ["x", "se"], ["num"]), mk("Div", ["num", "k1"], ["m"]),
            mk("Sub", ["m", "m_prev"], ["dm"]), mk("Mul", ["k5", "dm"], ["d1"]),
            mk("Mul", ["k2", "x"], ["cx"]), mk("Mul", ["k3", "m"], ["am"]), mk("Sub", ["cx", "am"], ["base"]),
            mk("Mul", ["k4", "d1"], ["hd"]), mk("Sub", ["base", "hd"], ["x_next"]),
            mk("Identity", ["m"], ["m_next"]),
        ]
    nodes += [
        mk("Add", ["idx", "one_i32"], ["idx_next"]),
        mk("Shape", ["t_table"], ["n64"]), mk("Cast", ["n64"], ["n32"], to=TensorProto.INT32),
        mk("Sub", ["n32", "one_i32"], ["last"]), mk("Min", ["idx_next", "last"], ["idx_clip"]),
        mk("Gather", ["t_table", "idx_clip"], ["t_next"], axis=0),
    ]
    graph = helper.make_graph(nodes, f"{SAMPLER_STEP_PREFIX}{kind}", [vi[n] for n in in_names], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="diffeic-export")
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    assert [o.name for o in outputs] == list(out_names)
    return model


# --------------------------------------------------------------------------- profiles


_DIM = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:/+\s*(\d+))?\s*$")


def dim_range(dim: int | str, axes: Mapping[str, Sequence[int]]) -> tuple[int, int, int]:
    """(min, opt, max) of one dimension: an int, an axis name, or ``name/k`` (e.g. ``h8/2``)."""
    if isinstance(dim, int) or (isinstance(dim, str) and dim.isdigit()):
        d = int(dim)
        return d, d, d
    m = _DIM.match(str(dim))
    if not m or m.group(1) not in axes:
        raise ValueError(f"dimension {dim!r} names no known axis (known: {sorted(axes)})")
    lo, opt, hi = (int(v) for v in axes[m.group(1)])
    k = int(m.group(2) or 1)
    return max(lo // k, 1), max(opt // k, 1), max(hi // k, 1)


def input_profiles(inputs: Iterable[tuple[str, Sequence[int | str]]], axes: Mapping[str, Sequence[int]]
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """name -> (min shape, opt shape, max shape) for every input."""
    out = {}
    for name, shape in inputs:
        r = [dim_range(d, axes) for d in shape]
        out[name] = tuple(tuple(x[j] for x in r) for j in range(3))
    return out  # type: ignore[return-value]


def pixel_axes(min_hw: Sequence[int] | None, opt_hw: Sequence[int] | None, max_hw: Sequence[int] | None
               ) -> dict[str, tuple[int, int, int]] | None:
    if min_hw is None and opt_hw is None and max_hw is None:
        return None
    d = PixelProfile()
    p = PixelProfile(tuple(min_hw or d.min_hw), tuple(opt_hw or d.opt_hw), tuple(max_hw or d.max_hw))
    return p.axes()


# --------------------------------------------------------------------------- building


def device_info() -> tuple[str, str] | None:
    """(GPU name, compute capability) of device 0, or None without a usable GPU."""
    try:
        from runtime.engines import gpu_device

        return gpu_device()
    except Exception:  # no cuda-python, no driver, no device
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:
        pass
    return None


class EngineBuilder:
    """One TensorRT(-RTX) builder session: module, target, shared timing cache."""

    def __init__(self, builder: str = "auto", compute_capability: str | None = None,
                 timing_cache: Path | None = None) -> None:
        self.trt = import_tensorrt(None if builder == "auto" else builder)
        self.flavour = self.trt.__name__
        if builder != "auto" and self.flavour != builder:
            raise ImportError(f"builder {builder!r} requested but only {self.flavour} is importable")
        self.rtx = self.flavour == "tensorrt_rtx"
        self.version = trt_version_string(self.flavour, self.trt.__version__)
        dev = device_info()
        if self.rtx:
            cc = compute_capability or (dev[1] if dev else None)
            if cc is None:
                raise ValueError("no GPU here: pass --compute-capability (e.g. 89) for an ahead-of-time TensorRT-RTX build")
            self.cc = normalize_cc(cc)
            # RTX plans are JIT-specialised on the target at load, portable across GPUs of this capability.
            self.gpu = f"AOT:{self.cc}"
        else:
            if dev is None:
                raise RuntimeError("the tensorrt builder needs an NVIDIA GPU (and cuda-python or torch.cuda to name it); "
                                   "use --builder tensorrt_rtx for an ahead-of-time build without a GPU")
            self.gpu, self.cc = dev
            if compute_capability and normalize_cc(compute_capability) != self.cc:
                log.warning("--compute-capability %s ignored: tensorrt builds for this GPU (%s, cc %s)",
                            compute_capability, self.gpu, self.cc)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.builder = self.trt.Builder(self.logger)
        self.timing_cache_path = timing_cache
        self._cache = None
        self.last_build_flags: frozenset[str] = frozenset()  # BuilderFlags the last build set (recorded in the manifest)
        if timing_cache is not None and self.rtx:
            log.info("timing caches are no-ops in TensorRT-RTX; %s is not used", timing_cache)

    def _timing_cache(self, config: Any) -> Any:
        if self._cache is None:
            data = b""
            if self.timing_cache_path is not None and self.timing_cache_path.is_file():
                data = self.timing_cache_path.read_bytes()
                log.info("loaded timing cache %s (%d bytes)", self.timing_cache_path, len(data))
            self._cache = config.create_timing_cache(data)
        return self._cache

    def build(self, onnx_path: Path, profiles: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]],
              strict_fp32: bool = False, workspace_bytes: int | None = None) -> bytes:
        """Parse ``onnx_path`` (strongly typed) and return the serialized plan."""
        trt = self.trt
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = self.builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = self.builder.create_builder_config()
        profile = self.builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            if t.name not in profiles:
                if any(d < 0 for d in t.shape):
                    raise ValueError(f"{onnx_path.name}: no profile for dynamic input {t.name!r} {tuple(t.shape)}")
                continue
            lo, opt, hi = (tuple(int(d) for d in s) for s in profiles[t.name])
            profile.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(profile)
        if strict_fp32 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # parsing-path networks: no reduced-precision matmuls
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        flags: set[str] = set()
        if self.rtx and hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
            # TensorRT-RTX: an engine that may allocate on its own at run time cannot be
            # captured into a CUDA graph; this flag makes it use application memory only.
            config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
            flags.add("REQUIRE_USER_ALLOCATION")
        if self.rtx:
            config.num_compute_capabilities = 1
            name = "SM" + self.cc.replace(".", "")
            if not hasattr(trt.ComputeCapability, name):
                known = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
                raise ValueError(f"TensorRT-RTX {self.trt.__version__} cannot target {name}; it supports {known}")
            config.set_compute_capability(getattr(trt.ComputeCapability, name), 0)
        elif self.timing_cache_path is not None:
            config.set_timing_cache(self._timing_cache(config), False)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None and "REQUIRE_USER_ALLOCATION" in flags:
            # Seen here: with the flag, TensorRT-RTX plans the memory of the largest profile
            # up front and can fail (a 2048x2048 UNet profile asked for 64 GiB). Such an
            # engine still runs; the runtime then denoises without CUDA graphs.
            log.warning("%s: build with REQUIRE_USER_ALLOCATION failed; rebuilding without it (the engine will "
                        "not be CUDA-graph capturable; a smaller --max profile avoids this)", onnx_path.name)
            config.clear_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
            flags.discard("REQUIRE_USER_ALLOCATION")
            plan = self.builder.build_serialized_network(network, config)
        self.last_build_flags = frozenset(flags)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
        return bytes(memoryview(plan))

    def save_timing_cache(self) -> None:
        if self._cache is None or self.timing_cache_path is None or self.rtx:
            return
        _atomic_write(self.timing_cache_path, bytes(memoryview(self._cache.serialize())))
        log.info("saved timing cache %s", self.timing_cache_path)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_engine(artifact_dir: Path, key: str, entry: EngineEntry, extra: Mapping[str, Any]) -> None:
    """Add/replace one engine record in manifest.json, atomically (read, validate, replace)."""
    path = artifact_dir / MANIFEST_NAME
    raw = json.loads(path.read_text())
    rec = asdict(entry)
    rec["profile"] = {k: list(v) for k, v in entry.profile.items()}
    rec.update(extra)
    raw.setdefault("engines", {})[key] = rec
    Manifest.from_dict(raw)  # never write a manifest the runtime would refuse
    _atomic_write(path, (json.dumps(raw, indent=1, sort_keys=True) + "\n").encode())


def build_all(artifact_dir: Path, networks: Sequence[str] | None = None, fp16: bool = False,
              min_hw: Sequence[int] | None = None, opt_hw: Sequence[int] | None = None,
              max_hw: Sequence[int] | None = None, static_hw: Sequence[Sequence[int]] = (),
              timing_cache: Path | None = None, builder: str = "auto",
              compute_capability: str | None = None, tile: int | None = None) -> dict[str, EngineEntry]:
    """Build the requested engines into ``artifact_dir/engines`` and record them; returns them by key.

    ``tile`` (pixels) adds static ``tile`` x ``tile`` engines of the VAE networks, the shape
    the runtime's tiled VAE (runtime.tiling) runs them at."""
    if tile is not None and (tile < 128 or tile % 64):
        raise ValueError(f"--tile must be a multiple of 64 pixels and at least 128, got {tile}")
    manifest, artifact_dir = load_manifest(artifact_dir)
    raw_networks = json.loads((artifact_dir / MANIFEST_NAME).read_text()).get("networks", {})
    explicit = networks is not None
    wanted = list(networks) if explicit else [n for n in DEFAULT_NETWORKS
                                             if n in manifest.networks or n.startswith(SAMPLER_STEP_PREFIX)]
    for n in wanted:
        if n not in manifest.networks and not n.startswith(SAMPLER_STEP_PREFIX):
            raise ValueError(f"network {n!r} is not in the artifacts; available: {sorted(manifest.networks)}")
    eb = EngineBuilder(builder, compute_capability, timing_cache)
    axes_override = pixel_axes(min_hw, opt_hw, max_hw)
    default_axes = PixelProfile().axes()
    engines_dir = artifact_dir / "engines"
    engines_dir.mkdir(exist_ok=True)
    built: dict[str, EngineEntry] = {}
    targets: list[tuple[str, dict[str, tuple[int, int, int]], bool, str]] = []
    for n in wanted:
        entry = manifest.networks.get(n)
        axes = dict(default_axes)
        if entry is not None:
            axes.update({k: tuple(v) for k, v in entry.profile.items()})
        elif "control_unet" in manifest.networks:  # sampler step: latent axes of the UNet's export profile
            axes.update({k: tuple(v) for k, v in manifest.networks["control_unet"].profile.items()})
        if axes_override:
            axes.update(axes_override)
        targets.append((n, axes, False, n))
        statics = [tuple(hw) for hw in static_hw]
        if tile and n in TILED_NETWORKS and (tile, tile) not in statics:
            statics.append((tile, tile))
        for hw in statics:
            s = PixelProfile(tuple(hw), tuple(hw), tuple(hw)).axes()
            targets.append((n, {**axes, **s}, True, f"{n}@{hw[0]}x{hw[1]}"))
    with tempfile.TemporaryDirectory(dir=engines_dir, prefix=".build-") as tmp:
        tmpdir = Path(tmp)
        sources: dict[tuple[str, str], tuple[Path, str, list]] = {}
        for network, axes, static, key in targets:
            precision = "fp16" if fp16 and fp16_allowed(network, raw_networks.get(network)) else "fp32"
            if fp16 and precision == "fp32":
                log.info("%s stays FP32 (not FP16-safe)", network)
            if network.startswith(SAMPLER_STEP_PREFIX):
                axes = {**axes, "n": (1, 50, MAX_STEPS)}
            if (network, precision) not in sources:
                sources[(network, precision)] = _prepare_source(manifest, artifact_dir, tmpdir, network, precision)
            src, src_sha, inputs = sources[(network, precision)]
            profiles = input_profiles(inputs, axes)
            log.info("building %s (%s%s) with %s for %s", key, precision, ", static" if static else "",
                     eb.version, eb.gpu)
            plan = eb.build(src, profiles, strict_fp32=precision == "fp32" and is_parsing_network(network))
            suffix = f".{key.split('@')[1]}" if static else ""
            file = f"engines/{network}{suffix}.plan"
            _atomic_write(artifact_dir / file, plan)
            used_axes = {a: tuple(int(v) for v in axes[a]) for a in sorted(axes) if _uses_axis(inputs, a)}
            ee = EngineEntry(network=network, file=file, sha256=sha256_file(artifact_dir / file),
                             trt_version=eb.version, gpu=eb.gpu, compute_capability=eb.cc, precision=precision,
                             profile=used_axes, static_shape=static)
            record_engine(artifact_dir, key, ee, {
                "fingerprint": manifest.fingerprint, "source_sha256": src_sha, "builder": eb.flavour,
                "build_flags": sorted(eb.last_build_flags),
                "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            })
            built[key] = ee
            log.info("wrote %s (%.1f MiB)", file, len(plan) / 2**20)
    eb.save_timing_cache()
    return built


def _uses_axis(inputs: Sequence[tuple[str, Sequence[int | str]]], axis: str) -> bool:
    return any(isinstance(d, str) and _DIM.match(d) and _DIM.match(d).group(1) == axis for _, s in inputs for d in s)


def _prepare_source(manifest: Manifest, artifact_dir: Path, tmpdir: Path, network: str,
                    precision: str) -> tuple[Path, str, list[tuple[str, Sequence[int | str]]]]:
    """The ONNX file to parse, the sha256 it was made from, and its inputs (name, shape)."""
    if network.startswith(SAMPLER_STEP_PREFIX):
        kind = network[len(SAMPLER_STEP_PREFIX):]
        model = sampler_step_model(kind, int(manifest.model.get("latent_channels", 4)))
        path = tmpdir / f"{network}.onnx"
        onnx.save_model(model, str(path))
        return path, sha256_file(path), _model_inputs(model)
    entry = manifest.networks[network]
    src = artifact_dir / entry.file
    sha = sha256_file(src)
    if sha != entry.sha256:
        raise ValueError(f"{src} does not match the manifest (sha256); re-export the artifacts")
    inputs = [(t.name, t.shape) for t in entry.inputs]
    if precision == "fp32":
        return src, sha, inputs  # external weights resolve next to the original file
    model = onnx.load(str(src))  # loads external data from the artifact directory
    half = convert_to_fp16(model)
    path = tmpdir / f"{network}.fp16.onnx"
    onnx.save_model(half, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{network}.fp16.onnx.data", size_threshold=1024)
    return path, sha, inputs


def _model_inputs(model: onnx.ModelProto) -> list[tuple[str, Sequence[int | str]]]:
    out = []
    for i in model.graph.input:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        out.append((i.name, dims))
    return out


def _hw(s: Sequence[str]) -> tuple[int, int]:
    return int(s[0]), int(s[1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.build_engines", description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path, help="artifact directory written by `python -m export`")
    p.add_argument("--fp16", action="store_true", help="FP16 engines for the FP16-safe networks")
    p.add_argument("--min", nargs=2, metavar=("H", "W"), help="smallest padded image size, pixels")
    p.add_argument("--opt", nargs=2, metavar=("H", "W"), help="size the tactics are tuned for")
    p.add_argument("--max", nargs=2, metavar=("H", "W"), help="largest padded image size, pixels")
    p.add_argument("--static", nargs=2, metavar=("H", "W"), action="append", default=[],
                   help="also build a static-shape engine for this size (repeatable)")
    p.add_argument("--tile", type=int, metavar="PX",
                   help="also build static PX x PX engines of the VAE networks for tiled decoding/encoding")
    p.add_argument("--timing-cache", type=Path, help="timing cache file to load and update")
    p.add_argument("--networks", nargs="+", help=f"networks to build (default: {' '.join(DEFAULT_NETWORKS)})")
    p.add_argument("--builder", choices=("auto", "tensorrt", "tensorrt_rtx"), default="auto")
    p.add_argument("--compute-capability", help="target compute capability for tensorrt_rtx, e.g. 89")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        built = build_all(a.artifacts, a.networks, a.fp16, a.min and _hw(a.min), a.opt and _hw(a.opt),
                          a.max and _hw(a.max), [_hw(s) for s in a.static], a.timing_cache, a.builder,
                          a.compute_capability, a.tile)
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, e in built.items():
        print(f"{key}: {e.file} {e.precision} {e.trt_version} {e.gpu} cc {e.compute_capability}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
