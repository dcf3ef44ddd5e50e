"""Cross-backend desync harness: encode with one backend, entropy-decode with others.

For each image and each entropy path (``reference`` float context model, ``portable``
integer one) the stream is written by ONNX Runtime (all threads, full graph
optimization) and parsed by: ONNX Runtime with 1 thread and graph optimization off,
ONNX Runtime with the context-model outputs perturbed by about one float16 ulp (what an
FP16 engine would do), and, for reference-path streams, the PyTorch reference pipeline.
A desync is a decoder error or a decoded symbol that differs from the encoder's
(y_hat off by 0.5 or more; float noise in the means moves y_hat by ulps only).

    python benchmarks/desync_backends.py --artifacts DIR [--fixture FIXTURE] [--out desync_backends.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.backends.onnxruntime import OrtBackend  # noqa: E402
from runtime.config import defaults  # noqa: E402
from runtime.entropy_coding import YDecoder, decode_z  # noqa: E402
from runtime.latent_coding import code_slices  # noqa: E402
from runtime.pipeline import Codec  # noqa: E402

log = logging.getLogger("desync")


class PerturbedBackend:
    """Wraps a backend; every float output of the parsing-path networks moves by ~1 fp16 ulp."""

    def __init__(self, inner: Any, seed: int, rel: float = 2.0**-10) -> None:
        self.inner, self.rng, self.rel, self.name = inner, np.random.default_rng(seed), rel, "perturbed"

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.run(network, inputs)
        if network == "hyper_decoder" or network.startswith("ctx_"):
            out = {k: (v * (1 + self.rel * self.rng.choice([-1.0, 1.0], v.shape))).astype(np.float32)
                   for k, v in out.items()}
        return out

    def has(self, network: str) -> bool:
        return self.inner.has(network)

    def close(self) -> None:
        self.inner.close()


def y_hat_of(codec: Codec, data: bytes) -> np.ndarray:
    """Entropy-decode only (no sampling): the y_hat the decoder reconstructs."""
    stream = codec.parse(data)
    if stream.entropy_path == "portable":
        z_hat = decode_z(stream.z, codec.bottleneck, stream.z_hw, stream.coder_format)
        return codec._require_portable().decode(stream.y, z_hat, codec.gaussian, stream.coder_format)[0]
    z_hat = decode_z(stream.z, codec.bottleneck, stream.z_hw, stream.coder_format)
    hyper_params, _ = codec._hyper(z_hat)
    dec = YDecoder(stream.y, codec.gaussian, stream.coder_format)
    y_hat = code_slices(codec.backend.run, hyper_params, codec.slice_ch,
                        lambda s, m, half, c0, c1: dec.decode_half(s, m, half))
    dec.finish()
    return y_hat


def images(fixture: Path | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if fixture is not None:
        for case in ("", "pad"):
            p = fixture / case / "input.png"
            if p.is_file():
                out[f"fixture{('-' + case) if case else ''}"] = np.asarray(Image.open(p).convert("RGB"))
    photo = np.asarray(Image.open(REPO / "examples" / "coffee.png").convert("RGB"))
    for h, w in ((128, 192), (192, 256), (240, 360)):
        out[f"coffee-{h}x{w}"] = np.ascontiguousarray(photo[:h, :w])
    return out


def run(artifacts: Path, fixture: Path | None = None, seeds: int = 2) -> dict[str, Any]:
    cfg = defaults()
    encoder = Codec(artifacts, cfg)
    decoders: dict[str, Callable[[], Codec]] = {
        "ort-1thread-noopt": lambda: Codec(artifacts, cfg.with_(threads=1), backend=OrtBackend(
            encoder.manifest, encoder.directory, cfg.with_(threads=1), graph_optimization="disable")),
    }
    for s in range(seeds):
        decoders[f"ort-perturbed-fp16ulp-{s}"] = lambda s=s: Codec(
            artifacts, cfg, backend=PerturbedBackend(OrtBackend(encoder.manifest, encoder.directory, cfg), seed=s))
    built = {k: f() for k, f in decoders.items()}
    paths = ["reference"] + (["portable"] if encoder.portable is not None else [])
    report: dict[str, Any] = {"images": {}, "summary": {}}
    for name, img in images(fixture).items():
        for path in paths:
            data = encoder.encode(img, entropy_path=path).data
            want = y_hat_of(encoder, data)
            for dname, dec in built.items():
                try:
                    ok = bool(np.abs(y_hat_of(dec, data) - want).max() < 0.5)
                except ValueError as exc:  # the rANS decoder noticed the desync
                    ok = False
                    log.debug("%s %s %s: %s", name, path, dname, exc)
                report["images"].setdefault(name, {}).setdefault(path, {})[dname] = "ok" if ok else "DESYNC"
                agg = report["summary"].setdefault(path, {}).setdefault(dname, {"trials": 0, "desyncs": 0})
                agg["trials"] += 1
                agg["desyncs"] += 0 if ok else 1
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--fixture", default=None)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/desync_backends.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    rep = run(Path(args.artifacts), Path(args.fixture) if args.fixture else None, args.seeds)
    Path(args.out).write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
