"""Test helper: run the OFFICIAL DiffEIC DPM-Solver++ code (random weights, CPU).

The official repository (huai-chang/DiffEIC, commit ``OFFICIAL_COMMIT``) ships its sampler
as ``ldm/models/diffusion/dpm_solver/dpm_solver.py`` (Stability AI's copy of DPM-Solver).
We never copy that code into this project; this helper loads it from one of:

1. ``DIFFEIC_OFFICIAL_SRC``: a checkout of the official repository; the file is used
   verbatim after its sha256 is checked against ``DPM_SOLVER_SHA256``;
2. the ``stable-diffusion-sdkit`` wheel (PyPI, installed ``--no-deps`` by ``.ci/run``),
   which vendors the same Stability AI file with progress callbacks added. The helper
   removes exactly those callback additions and checks that the result has the official
   file's sha256, so what runs is byte for byte the official arithmetic.

If neither is present the caller skips, saying why. ``official_dpmpp_sample`` replays
what the official ``DPMSolverSampler.sample`` does (its device handling forces CUDA, so
its few lines are restated here, on the CPU, with the official arguments).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import types
from pathlib import Path
from typing import Callable

import numpy as np

OFFICIAL_COMMIT = "9c21915746d37b144f980bb35e144ec9c0977de9"
DPM_SOLVER_PATH = "ldm/models/diffusion/dpm_solver/dpm_solver.py"
# sha256 of DPM_SOLVER_PATH at OFFICIAL_COMMIT (git show OFFICIAL_COMMIT:DPM_SOLVER_PATH | sha256sum)
DPM_SOLVER_SHA256 = "000c2bc0d23662f4018bf35144a899c734e4278415a4954d7f479906c00ceaf3"
SDKIT = "stable-diffusion-sdkit"


class OfficialCodeUnavailable(RuntimeError):
    """The official source could not be found (or did not verify); tests skip with this text."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def strip_sdkit_callbacks(text: str) -> str:
    """Undo the only changes sdkit made to the Stability AI file: progress callbacks."""
    t = re.sub(r"\n[ \t]*if (img_)?callback: (img_)?callback\([^\n]*\)(?=\n)", "", text)
    t = t.replace(", callback=None, img_callback=None):", "):")
    t = re.sub(r"\n[ \t]*callback=None, img_callback=None,(?=\n)", "", t)
    return re.sub(r"solver_type=solver_type,\n[ \t]*callback=callback, img_callback=img_callback\)",
                  "solver_type=solver_type)", t)


def official_dpm_solver_source() -> tuple[str, str]:
    """(source text, where it came from), verified against ``DPM_SOLVER_SHA256``."""
    reasons = []
    src = os.environ.get("DIFFEIC_OFFICIAL_SRC")
    if src:
        path = Path(src) / DPM_SOLVER_PATH
        if path.is_file():
            text = path.read_text()
            if _sha(text) == DPM_SOLVER_SHA256:
                return text, f"{path} (verbatim, sha256 {DPM_SOLVER_SHA256[:12]})"
            reasons.append(f"{path} does not have the official sha256")
        else:
            reasons.append(f"DIFFEIC_OFFICIAL_SRC={src} has no {DPM_SOLVER_PATH}")
    try:
        dist = importlib.metadata.distribution(SDKIT)
        path = Path(str(dist.locate_file(DPM_SOLVER_PATH)))
        text = strip_sdkit_callbacks(path.read_text())
        if _sha(text) == DPM_SOLVER_SHA256:
            return text, (f"{SDKIT} {dist.version}: {DPM_SOLVER_PATH} minus its progress callbacks "
                          f"== official sha256 {DPM_SOLVER_SHA256[:12]}")
        reasons.append(f"{SDKIT} {dist.version}'s dpm_solver.py does not reduce to the official file")
    except (importlib.metadata.PackageNotFoundError, OSError) as exc:
        reasons.append(f"{SDKIT} is not installed ({exc.__class__.__name__})")
    raise OfficialCodeUnavailable(
        "official DPM-Solver code not found: " + "; ".join(reasons)
        + f" (pip install --no-deps {SDKIT}==2.1.5, or set DIFFEIC_OFFICIAL_SRC to a DiffEIC checkout)")


def load_official_dpm_solver() -> tuple[types.ModuleType, str]:
    """The official ``dpm_solver`` module (needs torch and tqdm only) and its provenance."""
    text, where = official_dpm_solver_source()
    mod = types.ModuleType("official_dpm_solver")
    mod.__file__ = DPM_SOLVER_PATH
    exec(compile(text, f"<official {DPM_SOLVER_PATH}>", "exec"), mod.__dict__)  # noqa: S102 (verified source)
    return mod, where


def official_dpmpp_sample(eps_fn: Callable, x_T: np.ndarray, steps: int, alphas_cumprod_f32: np.ndarray,
                          condition: object = None) -> dict[str, object]:
    """Run the official DPM-Solver++ the way ``DPMSolverSampler.sample`` does.

    ``eps_fn(x, t, c)`` is ``DiffEIC.apply_model`` (torch tensors in and out). Returns the
    final latent and every model call's (x, t) in call order, float32 numpy.
    """
    import torch

    mod, where = load_official_dpm_solver()
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def apply_model(x: "torch.Tensor", t: "torch.Tensor", c: object) -> "torch.Tensor":
        calls.append((x.detach().numpy().copy(), t.detach().numpy().copy()))
        return eps_fn(x, t, c)

    # DPMSolverSampler.__init__: alphas_cumprod as float32 (moved to CUDA there; CPU here)
    alphas_cumprod = torch.from_numpy(np.asarray(alphas_cumprod_f32, np.float32)).clone().to(torch.float32)
    # DPMSolverSampler.sample, lines 71-85 of ldm/models/diffusion/dpm_solver/sampler.py
    img = torch.from_numpy(np.asarray(x_T, np.float32).copy())
    ns = mod.NoiseScheduleVP("discrete", alphas_cumprod=alphas_cumprod)
    model_fn = mod.model_wrapper(apply_model, ns, model_type="noise",  # MODEL_TYPES["eps"]
                                 guidance_type="classifier-free", condition={} if condition is None else condition,
                                 unconditional_condition=None, guidance_scale=1.0)
    dpm_solver = mod.DPM_Solver(model_fn, ns, predict_x0=True, thresholding=False)
    with torch.no_grad():
        x = dpm_solver.sample(img, steps=steps, skip_type="time_uniform", method="multistep", order=2,
                              lower_order_final=True)
    return {"samples": x.numpy().astype(np.float32), "calls": calls, "where": where, "module": mod}
