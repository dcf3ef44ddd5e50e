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
