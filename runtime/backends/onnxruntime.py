"""ONNX Runtime backend: one InferenceSession per network, created on first use and reused.

Sessions are verified against the manifest hash before they are built, configured with
the thread count of the RuntimeConfig and full graph optimization, and kept for the
life of the backend so a directory of images pays the load cost once. The CUDA
execution provider is used when onnxruntime-gpu provides it, otherwise the CPU one.

CPU performance settings (all output-preserving: same graph, float32; see
docs/performance.md for what each one measured):

* ``graph_optimization``: ORT level (``all`` = constant folding, fusions and the NCHWc
  convolution layout on CPU).
* ``spinning``: whether idle intra-op threads spin between ops. Spinning helps an
  otherwise idle machine; on a machine shared with other jobs it burns CPU the
  others need, so it is off by default only where asked (``spinning=False``).
* ``arena``: the CPU memory arena (off: plain malloc/free per tensor). ORT's arena never
  gives memory back by itself, so a session keeps its largest run's scratch for as long
  as it lives. Networks that run once per image (``ONE_SHOT``: the VAE, its tiles, the
  LFGCM analysis/synthesis) shrink their arena at the end of each run
  (``memory.enable_memory_arena_shrinkage``), so an encode followed by a decode in one
  process (the service) does not carry the encoder's gigabytes into the decoder; the
  denoising step keeps its arena between the steps of a loop (it is reused 50 times),
  and ``retains_scratch`` tells the memory planner so (runtime.tiling).
* ``io_binding``: inputs bound from the caller's numpy arrays without a copy, and
  outputs whose shape equals an input's (``eps`` of ``control_unet``) written into a
  preallocated numpy array.
* ``ort_graphs``: when the artifacts carry an ONNX Runtime variant of a network
  (``<name>.ort``, written by ``python -m export --ort-graphs``: attention fused into
  ``com.microsoft.MultiHeadAttention``, same weights), run that one. It never builds the
  (heads, N, N) attention scores: the paper-size control+UNet step needs 2.4 GB less
  memory and less time; outputs agree with the plain graph to float32 noise.
* ``optimized_dir``: save each optimized graph there (``optimized_model_filepath``) and
  load that next time; only for the machine that wrote it (level ``all`` emits
  hardware-specific kernels), keyed by the graph's sha256.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..config import RuntimeConfig
from ..manifest import Manifest, ManifestError, NetworkEntry, verify_file

log = logging.getLogger(__name__)

ORT_SUFFIX = ".ort"  # manifest name suffix of a network's ONNX Runtime-only variant (export.to_onnx)

# Named settings for benchmarks and A/B runs (OrtBackend(..., **OrtBackend.preset(name))).
PRESETS: dict[str, dict[str, Any]] = {
    # What the backend did before the CPU work: plain sess.run, default arena, spinning.
    "baseline": {"io_binding": False, "spinning": True, "ort_graphs": False},
    # The defaults.
    "fast": {},
}


# Networks that run once per image (or per VAE tile): their arena is shrunk after each run.
ONE_SHOT = frozenset({"image_encoder", "vae_encoder", "lfgcm_analysis", "content_decoder", "vae_decoder"})


class OrtBackend:
    name = "ort"

    def __init__(self, manifest: Manifest, directory: Path, cfg: RuntimeConfig,
                 graph_optimization: str = "all", *, io_binding: bool = True, arena: bool = True, spinning: bool = True,
                 ort_graphs: bool = True, optimized_dir: str | Path | None = None, extra_config: dict[str, str] | None = None) -> None:
        self.manifest = manifest
        self.directory = directory
        self.cfg = cfg
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.files: dict[str, str] = {}  # network -> graph file its session was built from
        self._level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        available = ort.get_available_providers()
        self.providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.io_binding = io_binding and self.providers[0] == "CPUExecutionProvider"
        self.arena = arena
        self.spinning = spinning
        self.ort_graphs = ort_graphs
        self.optimized_dir = Path(optimized_dir) if optimized_dir is not None else None
        self.extra_config = dict(extra_config or {})
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _arena_policy(self, network: str) -> str:
        """"none" (no CPU arena: plain malloc/free), "shrink" (a ONE_SHOT network) or "keep"."""
        if not (self.arena and self.providers[0] == "CPUExecutionProvider"):
            return "none"
        return "shrink" if network.removesuffix(ORT_SUFFIX) in ONE_SHOT else "keep"

    def retains_scratch(self, network: str) -> bool:
        """Whether ``network``'s session keeps its peak scratch allocated after a run (the
        CPU arena of a network not in ONE_SHOT)."""
        return self._arena_policy(network) == "keep"

    def _run_options(self, network: str) -> ort.RunOptions | None:
        # shrinking needs the arena (ORT refuses the option when it is disabled)
        return self._shrink if self._arena_policy(network) == "shrink" else None

    @staticmethod
    def preset(name: str) -> dict[str, Any]:
        if name not in PRESETS:
            raise ValueError(f"unknown OrtBackend preset {name!r}; valid: {sorted(PRESETS)}")
        return dict(PRESETS[name])

    def has(self, network: str) -> bool:
        return network in self.manifest.networks

    def graph_for(self, network: str) -> str:
        """The manifest network whose graph a run of ``network`` uses (its ``.ort`` variant if preferred)."""
        variant = network + ORT_SUFFIX
        return variant if self.ort_graphs and variant in self.manifest.networks else network

    def _options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = self._level
        so.intra_op_num_threads = self.cfg.n_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = self.arena
        if not self.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for k, v in self.extra_config.items():
            so.add_session_config_entry(k, v)
        return so

    def _providers(self) -> list[Any]:
        return list(self.providers)

    def session(self, network: str) -> ort.InferenceSession:
        """The (cached) session of ``network``; builds it on first use."""
        sess = self._sessions.get(network)
        if sess is not None:
            return sess
        entry: NetworkEntry | None = self.manifest.networks.get(network)
        variant = self.manifest.networks.get(network + ORT_SUFFIX) if self.ort_graphs else None
        if entry is not None and variant is not None:
            entry = variant
        if entry is None:
            raise ManifestError(
                f"network {network!r} is not in the artifacts; available: {sorted(self.manifest.networks)}"
            )
        if self.cfg.verify_hashes:
            verify_file(self.directory, entry.file, entry.sha256, network)
            for f, h in zip(entry.external_data, entry.external_sha256):
                verify_file(self.directory, f, h, f"{network} weights")
        so = self._options()
        path = self.directory / entry.file
        if self.optimized_dir is not None and self._level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            cached = self.optimized_dir / f"{network}-{entry.sha256[:16]}.ort.onnx"
            if cached.is_file():
                path = cached
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                self.optimized_dir.mkdir(parents=True, exist_ok=True)
                so.optimized_model_filepath = str(cached)
                if entry.external_data:
                    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                cached.name + ".data")
                    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                "1024")
        sess = ort.InferenceSession(str(path), sess_options=so, providers=self._providers())
        self._sessions[network] = sess
        self.files[network] = entry.file
        log.debug("loaded %s from %s (%s)", network, entry.file, sess.get_providers()[0])
        return sess

    _session = session  # older name

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(network)
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) if v.dtype == np.float64 else np.ascontiguousarray(v)
                 for k, v in inputs.items()}
        if not self.io_binding:
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(names, feeds, self._run_options(network))))
        binding = sess.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        outs: dict[str, np.ndarray] = {}
        entry = self.manifest.networks[network]
        in_shapes = {t.name: tuple(t.shape) for t in entry.inputs}
        for o in entry.outputs:
            # An output with the same symbolic shape as an input (eps ~ x_t) is known in
            # advance: let ORT write straight into our array.
            same = next((k for k, s in in_shapes.items() if s == tuple(o.shape) and k in feeds), None)
            if same is not None and o.dtype == "float32":
                arr = np.empty(feeds[same].shape, np.float32)
                binding.bind_output(o.name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
                outs[o.name] = arr
            else:
                binding.bind_output(o.name, "cpu")
        sess.run_with_iobinding(binding, self._run_options(network))
        rest = [o.name for o in entry.outputs if o.name not in outs]
        if rest:
            ort_outs = binding.get_outputs()
            names = [o.name for o in entry.outputs]
            for name, val in zip(names, ort_outs):
                if name not in outs:
                    outs[name] = val.numpy()
        return {o.name: outs[o.name] for o in entry.outputs}

    def close(self) -> None:
        self._sessions.clear()
