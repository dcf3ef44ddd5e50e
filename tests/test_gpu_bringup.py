"""The GPU bring-up script (benchmarks/gpu_bringup.py) on the simulator: it must run clean,
so that the one-shot run on a lent GPU is spent on the GPU, not on the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bringup_script_passes_on_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "bringup.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_bringup.py", "--simulate", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert rep["mode"] == "simulator (not a GPU)" and rep["failed"] == 0 and rep["passed"] >= 10
    names = " ".join(c["name"] for c in rep["checks"])
    for call in ("cudaStreamBeginCapture", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaEventElapsedTime",
                 "TrtBackend.denoise ddpm", "TrtBackend.denoise dpmpp"):
        assert call in names
    denoise = [c for c in rep["checks"] if c["name"].startswith("TrtBackend.denoise")]
    assert all(c["max_rel_err"] < 1e-6 and c["captures"] >= 1 for c in denoise)
    assert any("TensorRT engines" in s for s in rep["could_not_run"])
