"""Inference backends behind one interface: ``run(network, inputs) -> outputs``.

``ort`` (ONNX Runtime: CPU here, CUDA EP when onnxruntime-gpu is installed) runs the
exported ONNX graphs; ``trt`` (TensorRT engines, CUDA graphs) runs ``.plan`` engines on
NVIDIA GPUs. Both read only the artifact directory described by the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import BACKENDS, RuntimeConfig
from ..manifest import Manifest


class Backend(Protocol):
    name: str

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Evaluate one network on host arrays; returns host arrays by output name."""
        ...

    def has(self, network: str) -> bool: ...

    def close(self) -> None: ...


def make_backend(name: str, manifest: Manifest, directory: Path, cfg: RuntimeConfig) -> Backend:
    if name == "ort":
        from .onnxruntime import OrtBackend

        return OrtBackend(manifest, directory, cfg)
    if name == "trt":
        from .tensorrt import TrtBackend

        return TrtBackend(manifest, directory, cfg)
    raise ValueError(f"unknown backend {name!r}; valid choices: {list(BACKENDS)}")
