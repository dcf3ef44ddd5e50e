"""Cross-backend desync harness (benchmarks/desync_backends.py) on the session's artifacts:
the float (reference) path desyncs under fp16-sized perturbations, the portable path never."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_portable_path_never_desyncs(fixture_artifacts: Path, fixture_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import desync_backends
    finally:
        sys.path.pop(0)
    report = desync_backends.run(fixture_artifacts, fixture_dir, seeds=1)
    summary = report["summary"]
    assert set(summary) == {"reference", "portable"}
    for decoder, agg in summary["portable"].items():
        assert agg["trials"] >= 5 and agg["desyncs"] == 0, (decoder, agg)
    # The harness can see a desync: perturbing the float context model breaks the reference path.
    assert summary["reference"]["ort-perturbed-fp16ulp-0"]["desyncs"] > 0
