"""ONNX Runtime backend: one InferenceSession per network, created on first use and reused.

Sessions are verified against the manifest hash before they are built, configured with
the thread count of the RuntimeConfig and full graph optimization, and kept for the
life of the backend so a directory of images pays the load cost once. The CUDA
execution provider is used when onnxruntime-gpu provides it, otherwise the CPU one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..config import RuntimeConfig
from ..manifest import Manifest, ManifestError, NetworkEntry, verify_file

log = logging.getLogger(__name__)


class OrtBackend:
    name = "ort"

    def __init__(self, manifest: Manifest, directory: Path, cfg: RuntimeConfig,
                 graph_optimization: str = "all") -> None:
        self.manifest = manifest
        self.directory = directory
        self.cfg = cfg
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        available = ort.get_available_providers()
        self.providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]

    def has(self, network: str) -> bool:
        return network in self.manifest.networks

    def _session(self, network: str) -> ort.InferenceSession:
        sess = self._sessions.get(network)
        if sess is not None:
            return sess
        entry: NetworkEntry | None = self.manifest.networks.get(network)
        if entry is None:
            raise ManifestError(
                f"network {network!r} is not in the artifacts; available: {sorted(self.manifest.networks)}"
            )
        if self.cfg.verify_hashes:
            verify_file(self.directory, entry.file, entry.sha256, network)
            for f, h in zip(entry.external_data, entry.external_sha256):
                verify_file(self.directory, f, h, f"{network} weights")
        so = ort.SessionOptions()
        so.graph_optimization_level = self._level
        so.intra_op_num_threads = self.cfg.n_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(self.directory / entry.file), sess_options=so, providers=self.providers)
        self._sessions[network] = sess
        log.debug("loaded %s (%s)", network, sess.get_providers()[0])
        return sess

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self._session(network)
        names = [o.name for o in sess.get_outputs()]
        feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        outs = sess.run(names, feeds)
        return dict(zip(names, outs))

    def close(self) -> None:
        self._sessions.clear()
