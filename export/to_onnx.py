"""ONNX export of the DiffEIC networks: graph wrappers and one-graph export.

This module owns:

* the export wrappers: ``nn.Module``s with plain tensor inputs/outputs named as in
  :mod:`export.specs` (``image_encoder``, ``hyper_decoder``, ``ctx_anchor_i``,
  ``ctx_nonanchor_i``, ``content_decoder``, ``control_unet``, ``control``, ``unet``,
  ``vae_decoder``), built by :func:`graph_modules` from the loaded PyTorch models;
* :func:`example_inputs`: concrete tensors for a spec at a given z-grid size;
* :func:`export_network`: one graph to one ``.onnx`` file (plus one external-data file
  for graphs over the protobuf limit) with the new ``torch.export``-based exporter and
  ``torch.export.Dim`` dynamic shapes expressing the multiples of the z grid (image
  ``H = 64*zh``, latent ``h8 = 8*zh``...). If that exporter fails on a graph, the
  TorchScript exporter is used for that graph with ``dynamic_axes`` (logged). Either
  way the graph's I/O dims are renamed to the spec's axis names and checked against
  the spec, so the runtime, the TensorRT builder and the manifest agree.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .models.blocks import BasicTransformerBlock
from .models.lfgcm import LFGCM, AnchorParams, NonAnchorParams
from .models.unet import ControlledUNet, ControlModule, UNetModel
from .models.vae import AutoencoderKL
from .specs import AXIS_FACTORS, NetworkSpec, PixelProfile

log = logging.getLogger(__name__)

__all__ = [
    "ExportError", "ExportedGraph", "EXTERNAL_DATA_THRESHOLD",
    "ImageEncoderGraph", "VAEEncoderGraph", "AnalysisGraph", "HyperDecoderGraph", "ContentDecoderGraph", "ControlUNetGraph",
    "ControlGraph", "UNetGraph", "VAEDecoderGraph",
    "graph_modules", "residual_channels", "example_inputs", "example_grid", "export_network",
    "module_nbytes",
]

# Graphs whose weights exceed this are saved with external data: protobuf caps a
# serialized message at 2 GiB, and the margin covers graph structure and constants.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)


class ExportError(RuntimeError):
    """A graph could not be exported, or the exported graph does not match its spec."""


# =========================================================================== wrappers

class ImageEncoderGraph(nn.Module):
    """image in [0,1] -> z_g = VAE mode * scale_factor -> LFGCM analysis -> (y, z)."""

    def __init__(self, vae: AutoencoderKL, lfgcm: LFGCM) -> None:
        super().__init__()
        self.vae_encoder = vae
        self.lfgcm = lfgcm

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_g = self.vae_encoder.encode_mode_scaled(image * 2 - 1)
        return self.lfgcm.analysis(image, z_g)


class VAEEncoderGraph(nn.Module):
    """image in [0,1] -> z_g = VAE mode * scale_factor (the LFGCM's guidance latent)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae_encoder = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae_encoder.encode_mode_scaled(image * 2 - 1)


class AnalysisGraph(nn.Module):
    """(image in [0,1], z_g) -> (y, z): the LFGCM half of ``image_encoder``."""

    def __init__(self, lfgcm: LFGCM) -> None:
        super().__init__()
        self.lfgcm = lfgcm

    def forward(self, image: torch.Tensor, z_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lfgcm.analysis(image, z_g)


class HyperDecoderGraph(nn.Module):
    """z_hat -> (hyper_params, f_c)."""

    def __init__(self, lfgcm: LFGCM) -> None:
        super().__init__()
        self.lfgcm = lfgcm

    def forward(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lfgcm.hyper(z_hat)


class ContentDecoderGraph(nn.Module):
    """(y_hat, f_c) -> c_latent, the control hint."""

    def __init__(self, lfgcm: LFGCM) -> None:
        super().__init__()
        self.lfgcm = lfgcm

    def forward(self, y_hat: torch.Tensor, f_c: torch.Tensor) -> torch.Tensor:
        return self.lfgcm.content_decoder(y_hat, f_c)


def _require_folded(module: nn.Module, what: str) -> None:
    # An unfolded cross-attention would need the context as a graph input, which the
    # specs do not have; exporting it would bake a wrong (self-attention) path instead.
    for sub in module.modules():
        if isinstance(sub, BasicTransformerBlock) and not sub.attn2.folded:
            raise ExportError(f"{what}: cross-attention context is not folded; call fold_context first")


class ControlUNetGraph(nn.Module):
    """(x_t, t, c_latent) -> eps: control module + UNet with the empty-prompt K/V folded in."""

    def __init__(self, model: ControlledUNet) -> None:
        super().__init__()
        _require_folded(model, "control_unet")
        self.model = model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c_latent: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, t, c_latent)


class ControlGraph(nn.Module):
    """(x_t, t, c_latent) -> control residuals (ctrl_enc_k..., ctrl_mid, ctrl_dec_k...)."""

    def __init__(self, control: ControlModule) -> None:
        super().__init__()
        _require_folded(control, "control")
        self.control = control

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c_latent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.control(x_t, t, c_latent))


class UNetGraph(nn.Module):
    """(x_t, t, *residuals) -> eps: the base UNet consuming the control residuals."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        _require_folded(unet, "unet")
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *residuals: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, None, list(residuals))


class VAEDecoderGraph(nn.Module):
    """latent -> decoded = decoder(post_quant_conv(latent / scale_factor)), unclamped."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_scaled(latent)


@torch.no_grad()
def residual_channels(control: ControlModule, latent_channels: int, hint_channels: int) -> list[tuple[int, int]]:
    """(channels, downsampling factor vs the latent) of every control residual, by a small run."""
    h, w = 16, 24  # any multiple of 8 works; the factors do not depend on it
    res = control(torch.zeros(1, latent_channels, h, w), torch.zeros(1), torch.zeros(1, hint_channels, h, w))
    return [(int(r.shape[1]), h // int(r.shape[2])) for r in res]


def graph_modules(
    specs: Mapping[str, NetworkSpec],
    lfgcm: LFGCM,
    vae: AutoencoderKL,
    controlled_unet: ControlledUNet,
) -> dict[str, nn.Module]:
    """The export wrapper of every network in ``specs`` (context must already be folded)."""
    out: dict[str, nn.Module] = {}
    for name in specs:
        if name == "image_encoder":
            out[name] = ImageEncoderGraph(vae, lfgcm)
        elif name == "vae_encoder":
            out[name] = VAEEncoderGraph(vae)
        elif name == "lfgcm_analysis":
            out[name] = AnalysisGraph(lfgcm)
        elif name == "hyper_decoder":
            out[name] = HyperDecoderGraph(lfgcm)
        elif name.startswith("ctx_anchor_"):
            out[name] = AnchorParams(lfgcm, int(name.rsplit("_", 1)[1]))
        elif name.startswith("ctx_nonanchor_"):
            out[name] = NonAnchorParams(lfgcm, int(name.rsplit("_", 1)[1]))
        elif name == "content_decoder":
            out[name] = ContentDecoderGraph(lfgcm)
        elif name == "control_unet":
            out[name] = ControlUNetGraph(controlled_unet)
        elif name == "control":
            out[name] = ControlGraph(controlled_unet.control)
        elif name == "unet":
            out[name] = UNetGraph(controlled_unet.unet)
        elif name == "vae_decoder":
            out[name] = VAEDecoderGraph(vae)
        else:
            raise ExportError(f"no export wrapper for network {name!r}")
    for m in out.values():
        m.eval()
    return out


# =========================================================================== shapes

def _axis_units(axis: str) -> tuple[str, int]:
    """Spec axis name -> (root "zh"/"zw", size in units of the z grid).

    ``H`` = 64 zh, ``h8`` = 8 zh, ``h16`` = 4 zh, ``h64`` = zh, ``h8/2`` = 4 zh.
    """
    base, _, div = axis.partition("/")
    for factor, names in AXIS_FACTORS.items():
        if base in names:
            units = 64 // factor
            if div:
                d = int(div)
                if units % d:
                    raise ExportError(f"axis {axis!r} is not a whole multiple of the z grid")
                units //= d
            return ("zh" if names.index(base) == 0 else "zw"), units
    raise ExportError(f"unknown axis name {axis!r}")


def example_grid(profile: PixelProfile) -> tuple[int, int]:
    """A z-grid size inside the profile for tracing: not 1 (torch.export specialises 0/1
    sizes) and zh != zw (equal example sizes would be unified into one symbol)."""
    lo = (profile.min_hw[0] // 64, profile.min_hw[1] // 64)
    hi = (profile.max_hw[0] // 64, profile.max_hw[1] // 64)
    zh = min(max(2, lo[0]), hi[0])
    zw = min(max(3, lo[1]), hi[1])
    if zh == zw:
        if zw + 1 <= hi[1]:
            zw += 1
        elif zh + 1 <= hi[0]:
            zh += 1
    return zh, zw


def _concrete(shape: Sequence[int | str], zh: int, zw: int) -> tuple[int, ...]:
    out = []
    for d in shape:
        if isinstance(d, str):
            root, units = _axis_units(d)
            d = units * (zh if root == "zh" else zw)
        out.append(int(d))
    return tuple(out)


def example_inputs(spec: NetworkSpec, zh: int, zw: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of ``spec`` at z-grid size (zh, zw): images in [0,1], t in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = _concrete(t.shape, zh, zw)
        if t.name == "t":
            out.append(torch.randint(0, 1000, shape, generator=g).to(torch.float32))
        elif t.name == "image":
            out.append(torch.rand(shape, generator=g))
        else:
            out.append(torch.randn(shape, generator=g))
    return tuple(out)


def _dynamic_shapes(spec: NetworkSpec, profile: PixelProfile) -> tuple[object, ...]:
    """``dynamic_shapes`` (positional, varargs grouped) from the spec's symbolic axes."""
    lo = (profile.min_hw[0] // 64, profile.min_hw[1] // 64)
    hi = (profile.max_hw[0] // 64, profile.max_hw[1] // 64)
    roots: dict[str, object] = {}
    for k, name in enumerate(("zh", "zw")):
        # A profile that pins one side leaves that side static.
        roots[name] = torch.export.Dim(name, min=lo[k], max=hi[k]) if lo[k] < hi[k] else None
    per_input: list[dict[int, object] | None] = []
    for t in spec.inputs:
        dims: dict[int, object] = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                root, units = _axis_units(d)
                r = roots[root]
                if r is not None:
                    dims[i] = r if units == 1 else units * r  # type: ignore[operator]
        per_input.append(dims or None)
    return tuple(per_input)


def module_nbytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (the size of the graph's initializers)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# =========================================================================== export

@dataclass(frozen=True)
class ExportedGraph:
    """Files written for one network and how."""

    name: str
    path: Path
    external_data: tuple[Path, ...]
    exporter: str  # "dynamo" or "torchscript"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter: deprecation/user warnings, torch.onnx INFO/WARNING logs,
    and the progress lines the exporters print to stdout."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                              "torch._export", "onnxscript", "onnx_ir", "torch.utils._sympy")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _group_varargs(module: nn.Module, inputs: tuple[torch.Tensor, ...], dyn: tuple[object, ...]
                   ) -> tuple[tuple[object, ...], tuple[object, ...]]:
    # torch.export sees ``forward(a, b, *rest)`` as three arguments; dynamic_shapes must
    # group the varargs the same way (the tensors themselves are passed flat).
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        n_fixed = len(params) - 1
        return inputs, tuple(dyn[:n_fixed]) + (tuple(dyn[n_fixed:]),)
    return inputs, dyn


def _export_dynamo(module: nn.Module, spec: NetworkSpec, inputs: tuple[torch.Tensor, ...], path: Path,
                   opset: int, profile: PixelProfile, external: bool) -> None:
    inputs, dyn = _group_varargs(module, inputs, _dynamic_shapes(spec, profile))
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=opset, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dyn, optimize=True, external_data=external,
        )
        if program is None:
            raise ExportError(f"{spec.name}: the exporter returned no program")
        program.save(str(path), external_data=external)


def _export_torchscript(module: nn.Module, spec: NetworkSpec, inputs: tuple[torch.Tensor, ...], path: Path,
                        opset: int, external: bool) -> None:
    import onnx

    with _quiet(), torch.no_grad():
        if not external:
            torch.onnx.export(
                module, inputs, str(path), dynamo=False, opset_version=opset, verbose=False,
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
            )
            return
        # Over 2 GiB the TorchScript exporter writes one file per tensor; export into a
        # scratch folder and re-save with a single data file next to the graph.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}-") as scratch:
            tmp = Path(scratch) / path.name
            torch.onnx.export(
                module, inputs, str(tmp), dynamo=False, opset_version=opset, verbose=False,
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
            )
            model = onnx.load(str(tmp), load_external_data=True)
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)


def _fix_io(path: Path, spec: NetworkSpec) -> None:
    """Rename the graph's I/O dims to the spec's axis names and check names and static dims.

    The exporter names derived dims after their expression (``8*zh``); the spec's names
    (``h8``) are what the manifest profile and the TensorRT builder use. The model is
    loaded without its external data, so this is cheap for the 3.5 GB UNet too.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    init_names = {i.name for i in g.initializer}
    graph_inputs = [i for i in g.input if i.name not in init_names]
    for kind, values, specs in (("input", graph_inputs, spec.inputs), ("output", g.output, spec.outputs)):
        got = [v.name for v in values]
        want = [t.name for t in specs]
        if got != want:
            raise ExportError(f"{spec.name}: graph {kind}s are {got}, spec says {want}")
        for v, t in zip(values, specs):
            dims = v.type.tensor_type.shape.dim
            if len(dims) != len(t.shape):
                raise ExportError(f"{spec.name}: {t.name} has rank {len(dims)}, spec says {len(t.shape)}")
            for d, s in zip(dims, t.shape):
                if isinstance(s, str):
                    d.ClearField("dim_value")
                    d.dim_param = s
                elif d.HasField("dim_value") and d.dim_value != s:
                    raise ExportError(f"{spec.name}: {t.name} shape {[x.dim_value or x.dim_param for x in dims]} "
                                      f"does not match the spec {list(t.shape)}")
                else:
                    d.dim_value = int(s)
            elem = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            if str(elem) != t.dtype:
                raise ExportError(f"{spec.name}: {t.name} is {elem}, spec says {t.dtype}")
    onnx.save_model(model, str(path))


def export_network(
    module: nn.Module,
    spec: NetworkSpec,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    opset: int = 18,
    *,
    profile: PixelProfile | None = None,
    exporter: str = "dynamo",
    external_data: bool | None = None,
) -> ExportedGraph:
    """Export ``module`` (I/O as ``spec``) to ``path``; returns the files written.

    ``exporter`` is ``"dynamo"`` (``torch.export``, falling back to TorchScript for this
    graph on failure, logged) or ``"torchscript"``. ``external_data`` defaults to "weights
    over 1.5 GiB"; when set, the weights go to one file ``<path>.data``.
    """
    if opset < 18:
        raise ValueError(f"opset {opset} < 18 is not supported")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"unknown exporter {exporter!r} (dynamo or torchscript)")
    path = Path(path)
    profile = profile or PixelProfile()
    inputs = tuple(example_inputs)
    if len(inputs) != len(spec.inputs):
        raise ExportError(f"{spec.name}: {len(inputs)} example inputs for {len(spec.inputs)} spec inputs")
    if external_data is None:
        external_data = module_nbytes(module) > EXTERNAL_DATA_THRESHOLD
    module.eval()
    used = exporter
    if exporter == "dynamo":
        try:
            _export_dynamo(module, spec, inputs, path, opset, profile, external_data)
        except Exception as exc:  # noqa: BLE001 - any exporter failure triggers the fallback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("%s: dynamo exporter failed (%s: %s); falling back to the TorchScript exporter",
                        spec.name, type(exc).__name__, first[:300])
            for p in (path, path.with_name(path.name + ".data")):
                p.unlink(missing_ok=True)
            used = "torchscript"
    if used == "torchscript":
        _export_torchscript(module, spec, inputs, path, opset, external_data)
    _fix_io(path, spec)
    data = path.with_name(path.name + ".data")
    extra = (data,) if data.is_file() else ()
    if external_data and not extra:
        raise ExportError(f"{spec.name}: external data was requested but {data.name} was not written")
    if not external_data and extra:
        data.unlink()  # stale or empty; the graph holds its weights inline
        extra = ()
    log.debug("%s: exported with %s to %s", spec.name, used, path.name)
    return ExportedGraph(spec.name, path, extra, used)



# =========================================================================== ORT graphs

ORT_SUFFIX = ".ort"  # manifest name / file stem suffix of the ONNX Runtime variant of a graph


def fuse_attention(model: "onnx.ModelProto") -> int:  # noqa: F821 - onnx is imported lazily
    """Rewrite every exported attention (``(Q K^T) * scale -> Softmax -> @ V`` between the
    head split/merge reshapes) into one ``com.microsoft.MultiHeadAttention`` node, in place.

    The runtime (ONNX Runtime, CPU or CUDA) then never materialises the (heads, N, N)
    score tensor: at 512x768 the first control self-attention alone holds 3 GB of scores.
    Same math (softmax(scale * Q K^T) V), float32, so outputs differ only by summation
    order. Folded cross-attention K/V constants (1, heads, d, 77) / (1, heads, 77, d) are
    fed through a Transpose + Reshape that ORT constant-folds at load. Only the graph is
    touched; initializers (and external data) are kept as they are. Returns the count.
    The result is for ONNX Runtime only (contrib op): TensorRT builds from the plain graph.
    """
    import collections

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def const(name: str) -> "np.ndarray | None":
        t = inits.get(name)
        if t is not None and t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        c = consts.get(name)
        if c is not None and c.attribute and c.attribute[0].name == "value":
            return numpy_helper.to_array(c.attribute[0].t)
        return None

    def perm(n: "onnx.NodeProto | None") -> list[int] | None:
        if n is None or n.op_type != "Transpose":
            return None
        return next((list(a.ints) for a in n.attribute if a.name == "perm"), None)

    def split_source(name: str, want: list[int]) -> str | None:
        # (B, N, h*d) behind Reshape(B, N, h, d) -> Transpose(want)
        t = prod.get(name)
        if perm(t) != want:
            return None
        r = prod.get(t.input[0])  # type: ignore[union-attr]
        return r.input[0] if r is not None and r.op_type == "Reshape" else None

    def only(name: str) -> "onnx.NodeProto | None":
        c = cons.get(name, [])
        return c[0] if len(c) == 1 else None

    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    extra_inits: list[onnx.TensorProto] = []
    orphans: set[str] = set()  # scale constants the fused nodes no longer read
    count = 0
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        if any(a.name == "axis" and a.i not in (-1, 3) for a in sm.attribute):
            continue
        mul = prod.get(sm.input[0])
        scale = const(mul.input[1]) if mul is not None and mul.op_type == "Mul" else None
        mm1 = prod.get(mul.input[0]) if scale is not None and scale.size == 1 else None  # type: ignore[union-attr]
        if mm1 is None or mm1.op_type != "MatMul" or only(mm1.output[0]) is not mul or only(mul.output[0]) is not sm:
            continue
        mm2 = only(sm.output[0])
        if mm2 is None or mm2.op_type != "MatMul" or mm2.input[0] != sm.output[0]:
            continue
        tq = prod.get(mm1.input[0])
        rq = prod.get(tq.input[0]) if perm(tq) == [0, 2, 1, 3] else None  # type: ignore[union-attr]
        shape = const(rq.input[1]) if rq is not None and rq.op_type == "Reshape" else None  # type: ignore[union-attr]
        to = only(mm2.output[0])
        ro = only(to.output[0]) if perm(to) == [0, 2, 1, 3] else None  # type: ignore[union-attr]
        if shape is None or shape.size != 4 or ro is None or ro.op_type != "Reshape":
            continue
        heads, dim = int(shape[2]), int(shape[3])
        if heads <= 0 or dim <= 0:
            continue
        pre = f"fused_attention_{count}"
        nodes: list[onnx.NodeProto] = []
        flat = f"{pre}_shape"

        def from_const(name: str, p: list[int], tag: str) -> str | None:
            t = inits.get(name)
            if t is None or list(t.dims)[:2] != [1, heads]:
                return None
            nodes.append(helper.make_node("Transpose", [name], [f"{pre}_{tag}_t"], perm=p))
            nodes.append(helper.make_node("Reshape", [f"{pre}_{tag}_t", flat], [f"{pre}_{tag}"]))
            return f"{pre}_{tag}"

        key = split_source(mm1.input[1], [0, 2, 3, 1]) or from_const(mm1.input[1], [0, 3, 1, 2], "k")
        value = split_source(mm2.input[1], [0, 2, 1, 3]) or from_const(mm2.input[1], [0, 2, 1, 3], "v")
        if key is None or value is None:
            continue
        if len(nodes):
            extra_inits.append(numpy_helper.from_array(np.array([1, -1, heads * dim], np.int64), flat))
        nodes.append(helper.make_node(
            "MultiHeadAttention", [rq.input[0], key, value], [ro.output[0]], name=pre,  # type: ignore[union-attr]
            domain="com.microsoft", num_heads=heads, scale=float(scale.reshape(-1)[0])))  # type: ignore[union-attr]
        removed.update(id(n) for n in (mul, mm1, sm, mm2, to, ro))
        orphans.add(mul.input[1])
        replaced[id(ro)] = nodes
        count += 1
    if not count:
        return 0
    order: list[onnx.NodeProto] = []
    for n in g.node:
        order.extend(replaced.get(id(n), []))  # where the merge Reshape stood: inputs exist
        if id(n) not in removed:
            order.append(n)
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(order):  # drop what only fed the removed nodes
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = {i for n in g.node for i in n.input}
    dead = [t for t in g.initializer if t.name in orphans and t.name not in used]
    for t in dead:
        g.initializer.remove(t)
    g.initializer.extend(extra_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def write_ort_graph(path: str | Path, out: str | Path | None = None) -> Path | None:
    """``<name>.ort.onnx`` beside ``path``: the graph with :func:`fuse_attention` applied,
    sharing ``path``'s external data file (same folder). None when nothing was fused."""
    import onnx

    path = Path(path)
    out = Path(out) if out is not None else path.with_name(path.stem + ORT_SUFFIX + ".onnx")
    if out.parent.resolve() != path.parent.resolve():
        raise ValueError("the ORT graph must sit beside the original (it shares its external data)")
    model = onnx.load(str(path), load_external_data=False)
    n = fuse_attention(model)
    if not n:
        return None
    onnx.save_model(model, str(out))
    log.debug("%s: %d attention blocks fused into %s", path.name, n, out.name)
    return out
