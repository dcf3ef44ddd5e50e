"""Artifact manifest: discovery from any file, hash checks, version and structure errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.config import defaults
from runtime.manifest import ManifestError, find_artifact_dir, load_manifest, verify_file
from runtime.pipeline import Codec


def test_find_from_any_file(fixture_artifacts: Path, tmp_path: Path) -> None:
    assert find_artifact_dir(fixture_artifacts / "control_unet.onnx") == fixture_artifacts
    d = Path(shutil.copytree(fixture_artifacts, tmp_path / "a"))
    (d / "engines").mkdir()
    (d / "engines" / "unet.plan").write_bytes(b"plan")
    assert find_artifact_dir(d / "engines" / "unet.plan") == d  # the user's `--engine engines/unet.plan`
    with pytest.raises(ManifestError, match="no manifest.json"):
        find_artifact_dir(tmp_path)


def test_every_file_is_hashed(fixture_artifacts: Path) -> None:
    man, d = load_manifest(fixture_artifacts)
    for entry in man.networks.values():
        verify_file(d, entry.file, entry.sha256, entry.name)
    verify_file(d, man.tables_file, man.tables_sha256, "tables")


def test_tampered_artifacts_are_refused(fixture_artifacts: Path, tmp_path: Path) -> None:
    d = Path(shutil.copytree(fixture_artifacts, tmp_path / "a"))
    with open(d / "tables.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        Codec(d, defaults())
    d2 = Path(shutil.copytree(fixture_artifacts, tmp_path / "b"))
    with open(d2 / "hyper_decoder.onnx", "ab") as f:
        f.write(b"\0")
    codec = Codec(d2, defaults())  # graphs are verified when first loaded
    with pytest.raises(ManifestError, match="hyper_decoder"):
        codec.backend.run("hyper_decoder", {})


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=99), "format version 99"),
    (lambda m: m.pop("networks"), "malformed"),
    (lambda m: m["networks"]["hyper_decoder"].update(file="../../etc/passwd"), "outside the artifact directory"),
])
def test_bad_manifests(fixture_artifacts: Path, tmp_path: Path, edit, message: str) -> None:
    d = Path(shutil.copytree(fixture_artifacts, tmp_path / "a"))
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=message):
        man, _ = load_manifest(d)
        e = man.networks["hyper_decoder"]
        verify_file(d, e.file, e.sha256, "hyper_decoder")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        load_manifest(d)
