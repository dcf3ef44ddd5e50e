"""Shared test fixtures: the golden fixture folder and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("DIFFEIC_FIXTURE", REPO.parent / "shared/fixtures/diffeic-ref-tiny"))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "config.yaml").is_file():
        pytest.skip(f"golden fixture not found at {FIXTURE} (set DIFFEIC_FIXTURE)")
    return FIXTURE


def export_fixture_artifacts(fixture: Path, out: Path, *extra: str) -> Path:
    """Run `python -m export` on the fixture checkpoints (as a user would)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "export", "--sd", str(fixture / "sd.ckpt"), "--lc", str(fixture / "lc.ckpt"),
           "--config", str(fixture / "config.yaml"), "--null-context", str(fixture / "null_context.npy"),
           "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"export failed:\n{r.stdout}\n{r.stderr}"
    return out


@pytest.fixture(scope="session")
def fixture_artifacts(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Artifacts exported from the fixture checkpoints, shared by every test of a session."""
    return export_fixture_artifacts(fixture_dir, tmp_path_factory.mktemp("artifacts") / "fixture")
