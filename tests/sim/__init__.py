"""Test-only simulators of the GPU stack the TensorRT backend runs on (not a GPU).

``cudart`` simulates cuda-python's CUDA runtime bindings, ``tensorrt`` the TensorRT 10
runtime API; :func:`installed` puts them where ``runtime.engines.import_cudart`` and
``import_tensorrt`` look, for the duration of a ``with`` block. See docs/tensorrt.md
("The simulator") for what is modelled and what is not.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator

from .cudart import RULES as CUDA_RULES
from .cudart import Simulator, SimulatorError, SimulatorUnsupported
from .tensorrt import RULES as TRT_RULES
from .tensorrt import EngineSpec, IOSpec, SimTensorRT, onnx_engine_spec, record_builds

RULES = {**CUDA_RULES, **TRT_RULES}

__all__ = ["RULES", "EngineSpec", "IOSpec", "SimTensorRT", "Simulator", "SimulatorError", "SimulatorUnsupported",
           "installed", "onnx_engine_spec", "record_builds"]


@contextlib.contextmanager
def installed(cuda: Simulator, trt: SimTensorRT) -> Iterator[tuple[Simulator, SimTensorRT]]:
    """Make ``cuda.bindings.runtime`` and ``<trt flavour>`` import as the simulators."""
    names = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", trt.__name__)
    saved = {n: sys.modules.get(n) for n in names}
    pkg = types.ModuleType("cuda")
    pkg.__path__ = []  # type: ignore[attr-defined]
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__ = []  # type: ignore[attr-defined]
    bindings.runtime = cuda  # type: ignore[attr-defined]
    pkg.bindings = bindings  # type: ignore[attr-defined]
    pkg.cudart = cuda  # type: ignore[attr-defined]
    sys.modules.update({"cuda": pkg, "cuda.bindings": bindings, "cuda.bindings.runtime": cuda,  # type: ignore[dict-item]
                        "cuda.cudart": cuda, trt.__name__: trt})  # type: ignore[dict-item]
    try:
        yield cuda, trt
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
