"""The artifact manifest: the one description shared by ``export`` (writer) and ``runtime`` (reader).

An artifact directory holds ONNX graphs (and optionally TensorRT ``.plan`` engines),
``tables.npz`` (entropy-coder tables and sampler schedule) and ``manifest.json``. The
manifest lists every file with its sha256, the I/O of every network, the shape profile,
the model fingerprint and the versions of the tools that made them. The runtime trusts
nothing that the manifest does not vouch for: a file whose hash differs, a missing
network, or an unknown format version is refused with a message naming it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """An artifact directory is incomplete, tampered with, or from another version."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` entries are ints or symbolic axis names."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: tuple[int | str, ...]

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "TensorSpec":
        return TensorSpec(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))

    def concrete(self, height: int, width: int) -> tuple[int, ...]:
        """The shape for a padded image of ``height`` x ``width`` pixels (axis ``h8`` = H/8, ``h8/2`` = H/16)."""
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
                continue
            base, _, div = d.partition("/")
            side = height if base[0] in "Hh" else width
            factor = 1 if base in ("H", "W") else int(base[1:])
            out.append(side // factor // (int(div) if div else 1))
        return tuple(out)


@dataclass(frozen=True)
class NetworkEntry:
    """One exported network as the runtime sees it."""

    name: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Symbolic axis name -> (min, opt, max), in the units of that axis.
    profile: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    external_data: tuple[str, ...] = ()  # extra files (ONNX external weights), hashed too
    external_sha256: tuple[str, ...] = ()
    # Static memory model (export.memory): "weights" bytes, and the activation "peak" bytes
    # of one run at each of the probed "pixels" (padded image pixels). Empty: unknown.
    memory: Mapping[str, Any] = field(default_factory=dict)

    def activation_bytes(self, pixels: float) -> float | None:
        """Estimated activation bytes of one run at ``pixels`` padded image pixels, or None.

        Power-law interpolation between the probes (linear in log-log), the outermost
        segment's exponent beyond them."""
        m = self.memory
        if not m or "peak" not in m:
            return None
        xs = [math.log(float(p)) for p in m["pixels"]]
        ys = [math.log(max(float(b), 1.0)) for b in m["peak"]]
        x = math.log(max(float(pixels), 1.0))
        k = max(1, min(len(xs) - 1, bisect.bisect_left(xs, x)))
        slope = (ys[k] - ys[k - 1]) / (xs[k] - xs[k - 1])
        return math.exp(ys[k - 1] + slope * (x - xs[k - 1]))

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "NetworkEntry":
        return NetworkEntry(
            name=str(d["name"]), file=str(d["file"]), sha256=str(d["sha256"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            profile={k: tuple(v) for k, v in d.get("profile", {}).items()},
            external_data=tuple(d.get("external_data", ())),
            external_sha256=tuple(d.get("external_sha256", ())),
            memory=dict(d.get("memory", {})),
        )


@dataclass(frozen=True)
class EngineEntry:
    """A TensorRT engine built from one network, with what it was built for."""

    network: str
    file: str
    sha256: str
    trt_version: str
    gpu: str
    compute_capability: str
    precision: str
    profile: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    static_shape: bool = False

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "EngineEntry":
        return EngineEntry(
            network=str(d["network"]), file=str(d["file"]), sha256=str(d["sha256"]),
            trt_version=str(d["trt_version"]), gpu=str(d["gpu"]),
            compute_capability=str(d["compute_capability"]), precision=str(d["precision"]),
            profile={k: tuple(v) for k, v in d.get("profile", {}).items()},
            static_shape=bool(d.get("static_shape", False)),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about one artifact directory."""

    format_version: int
    fingerprint: str  # sha256 hex of weights + config
    model: Mapping[str, Any]  # sizes the runtime needs (latent channels, slice_ch, ...)
    networks: Mapping[str, NetworkEntry]
    tables_file: str
    tables_sha256: str
    opset: int
    versions: Mapping[str, str]
    engines: Mapping[str, EngineEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1, sort_keys=True, default=list)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Manifest":
        try:
            version = int(d["format_version"])
            if version != FORMAT_VERSION:
                raise ManifestError(
                    f"manifest format version {version} is not supported (this runtime reads {FORMAT_VERSION}); "
                    "re-export the artifacts with this version of the project"
                )
            return Manifest(
                format_version=version, fingerprint=str(d["fingerprint"]), model=dict(d["model"]),
                networks={k: NetworkEntry.from_dict(v) for k, v in d["networks"].items()},
                tables_file=str(d["tables_file"]), tables_sha256=str(d["tables_sha256"]),
                opset=int(d["opset"]), versions=dict(d["versions"]),
                engines={k: EngineEntry.from_dict(v) for k, v in d.get("engines", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def find_artifact_dir(path: str | Path) -> Path:
    """Accept the artifact directory or any file inside it (e.g. ``ARTIFACTS/engines/control_unet.plan``).

    The nearest directory at or above ``path`` (up to two levels) holding a manifest wins.
    """
    p = Path(path)
    if not p.exists():
        raise ManifestError(f"{path}: no such file or directory")
    start = p if p.is_dir() else p.parent
    for d in (start, start.parent, start.parent.parent):
        if (d / MANIFEST_NAME).is_file():
            return d
    raise ManifestError(
        f"{path}: no {MANIFEST_NAME} found in {start} or its parents; pass the directory written by "
        "`python -m export` (or any file inside it)"
    )


def load_manifest(path: str | Path) -> tuple[Manifest, Path]:
    """Read and structurally validate ``manifest.json``; returns (manifest, artifact_dir)."""
    d = find_artifact_dir(path)
    try:
        raw = json.loads((d / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{d / MANIFEST_NAME}: unreadable manifest ({exc})") from exc
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{d / MANIFEST_NAME}: manifest is not a JSON object")
    return Manifest.from_dict(raw), d


def verify_file(directory: Path, file: str, sha256: str, what: str) -> Path:
    """Check that an artifact file exists and has the hash the manifest records."""
    path = directory / file
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise ManifestError(f"{what}: manifest names a file outside the artifact directory: {file}")
    if not path.is_file():
        raise ManifestError(f"{what}: {path} is missing from the artifact directory")
    actual = sha256_file(path)
    if actual != sha256:
        raise ManifestError(
            f"{what}: {path} does not match the manifest (sha256 {actual[:16]}... != {sha256[:16]}...); "
            "the artifacts were modified or mixed from different exports"
        )
    return path
