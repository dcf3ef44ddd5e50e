"""Memory models of the exported graphs: how many bytes one run needs at a given image size.

For each network this module owns a static estimate, written into the manifest's network
record as ``memory = {"weights": W, "pixels": [...], "peak": [...]}``: the graph's
initializers take ``W`` bytes, and one run at a padded image of ``pixels[i]`` pixels needs
``peak[i]`` bytes of activations (``NetworkEntry.activation_bytes`` interpolates between the
probes in log-log space; attention makes the peak grow with the square of the pixels). The
activations are found without running anything: ONNX shape inference at each probe size
gives every tensor's size, and a liveness walk over the graph in its topological order (a
tensor lives from the node that makes it to its last consumer; graph inputs and outputs
live throughout) gives the peak.

It is a model of the graph, not of a backend: ONNX Runtime adds its arena's slack and
layout copies, TensorRT its own planner (usually less, in FP16). ``runtime.tiling`` applies
a measured overhead factor; ``benchmarks/bench_tiling.py`` compares estimates with measured
peaks.

    python -m export.memory ARTIFACTS     # add or refresh the models in an existing manifest
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, shape_inference

from runtime.manifest import MANIFEST_NAME, Manifest

log = logging.getLogger(__name__)

# z-grid sizes (image side / 64) probed: 64 .. 4096 px squares (shape inference costs the
# same at any size). The peak is not one polynomial (a high-resolution conv at small sizes,
# an attention score matrix at large ones), so the probes themselves are stored.
PROBE_GRIDS = (1, 2, 4, 8, 16, 32, 64)
_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8,
          TensorProto.INT64: 8, TensorProto.INT32: 4, TensorProto.INT8: 1, TensorProto.UINT8: 1,
          TensorProto.BOOL: 1, TensorProto.INT16: 2}
# axis family -> pixels per unit (as in export.specs.AXIS_FACTORS)
_FACTOR = {"H": 1, "W": 1, "h8": 8, "w8": 8, "h16": 16, "w16": 16, "h64": 64, "w64": 64}


def _axis_value(name: str, z: int) -> int:
    base, _, div = name.partition("/")
    if base not in _FACTOR:
        raise ValueError(f"unknown axis {name!r}")
    v = 64 * z // _FACTOR[base]
    return v // int(div) if div else v


def peak_activation_bytes(model: onnx.ModelProto, z: int) -> tuple[int, int]:
    """(peak live bytes of one run at a z x z grid, number of tensors whose size stayed unknown)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.value_info[:]
    inits = {t.name for t in g.initializer}
    for t in g.initializer:  # weights are counted separately; inference needs only the small
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and np.prod(t.dims) > 64:  # (shape) constants
            t.ClearField("raw_data")
            t.ClearField("float_data")
    for vi in g.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                v = _axis_value(d.dim_param, z)
                d.ClearField("dim_param")
                d.dim_value = v
    for vi in g.output:
        for d in vi.type.tensor_type.shape.dim:
            d.ClearField("dim_param")
            d.ClearField("dim_value")
    # Fused attention (com.microsoft.MultiHeadAttention, in the ONNX Runtime graphs) is
    # unknown to ONNX shape inference; for sizing, it is an op whose output has the query's
    # shape (its internal buffers are ONNX Runtime's business: see RUNTIME_OVERHEAD).
    for n in g.node:
        if n.domain == "com.microsoft" and n.op_type in ("MultiHeadAttention", "Attention") and n.input:
            q = n.input[0]
            del n.input[:]
            n.input.append(q)
            del n.attribute[:]
            n.domain, n.op_type = "", "Identity"
            del n.output[1:]
    inferred = shape_inference.infer_shapes(m, data_prop=True)
    sizes: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if tt.HasField("shape") and all(d >= 0 for d in dims):
            sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * _BYTES.get(tt.elem_type, 4)
    nodes = list(inferred.graph.node)
    unknown = 0
    for n in nodes:
        for o in n.output:
            if o and o not in sizes:
                # contrib attention ops (fused graphs) are unknown to ONNX: the output has the query's size
                if n.domain == "com.microsoft" and n.input and n.input[0] in sizes:
                    sizes[o] = sizes[n.input[0]]
                else:
                    unknown += 1
    last: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for x in n.input:
            last[x] = k
    keep = {o.name for o in g.output}
    live = {i.name: sizes.get(i.name, 0) for i in g.input if i.name not in inits}
    cur = sum(live.values())
    peak = cur
    for k, n in enumerate(nodes):
        for o in n.output:
            if o:
                live[o] = sizes.get(o, 0)
                cur += live[o]
        peak = max(peak, cur)
        for x in set(n.input):
            if x in live and last.get(x) == k and x not in keep and x not in {i.name for i in g.input}:
                cur -= live.pop(x)
    return int(peak), unknown


def weight_bytes(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) * _BYTES.get(t.data_type, 4) for t in model.graph.initializer))


def memory_model(path: Path, grids: Sequence[int] = PROBE_GRIDS) -> dict[str, float]:
    """The manifest ``memory`` record of one ONNX graph (see the module docstring)."""
    model = onnx.load(str(path), load_external_data=False)
    pixels = np.array([(64.0 * z) ** 2 for z in grids])
    peaks = []
    unknown = 0
    for z in grids:
        p, u = peak_activation_bytes(model, z)
        peaks.append(p)
        unknown = max(unknown, u)
    if unknown:
        log.warning("%s: %d tensor sizes unknown to shape inference; the estimate is low", path.name, unknown)
    return {"weights": float(weight_bytes(model)), "pixels": [float(p) for p in pixels],
            "peak": [float(p) for p in peaks], "unknown_tensors": float(unknown)}


def annotate(artifact_dir: Path, networks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Compute the memory models of ``networks`` (default: all) and write them into the manifest."""
    path = artifact_dir / MANIFEST_NAME
    raw = json.loads(path.read_text())
    out = {}
    for name, rec in raw["networks"].items():
        if networks is not None and name not in networks:
            continue
        out[name] = rec["memory"] = memory_model(artifact_dir / rec["file"])
        log.info("%s: weights %.1f MB, activations %s MB at %s px", name, out[name]["weights"] / 1e6,
                 [round(p / 1e6, 1) for p in out[name]["peak"]], [int(q**0.5) for q in out[name]["pixels"]])
    Manifest.from_dict(raw)  # never write a manifest the runtime would refuse
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", type=Path)
    p.add_argument("--networks", nargs="+")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        models = annotate(a.artifacts, a.networks)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, m in models.items():
        print(f"{name}: weights {m['weights'] / 1e6:.1f} MB, activations "
              + ", ".join(f"{int(q**0.5)} px {p / 2**20:.0f} MiB" for q, p in zip(m["pixels"], m["peak"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["PROBE_GRIDS", "annotate", "memory_model", "peak_activation_bytes", "weight_bytes"]
