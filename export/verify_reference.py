"""Check the PyTorch reference pipeline against a folder of official DiffEIC intermediates.

Usage::

    python -m export.verify_reference FIXTURE_DIR [--steps-only] [--stage NAME ...]

This module owns the comparison of :class:`export.reference.ReferencePipeline` with a
golden-fixture folder (``config.yaml``, ``sd.ckpt``, ``lc.ckpt``, ``null_context.npy``,
``input.png``, ``*.npz``, ``stream.bin``, ``output_*.png``) and every sub-case folder
below it that holds an ``input.png`` or ``.npz`` files (e.g. ``pad/``). A sub-case without
its own weights uses the nearest parent folder's. Any file may be absent: only the stages
whose reference files are present are checked.

Stages and what they compare:

* ``tables``: ``entropy_tables.npz`` (rebuilt CDF tables), exactly;
* ``vae``: ``vae.npz`` moments, z_g (from ``input.png``), decoded (from the file's z_g);
* ``lfgcm``: ``lfgcm.npz`` (control from ``input.png``; the symbol path run on the file's
  control and z_g): floats within tolerance, z/y symbols and y indexes exactly;
* ``stream``: ``input.png`` encoded must give ``stream.bin`` byte for byte, and decoding
  ``stream.bin`` must give the file's y symbols, z_hat, y_hat and c_latent;
* ``unet_eps``: ``unet_eps.npz``, one control+UNet call per stored (x_t, t);
* ``ddim`` / ``ddpm``: replaying the stored x_T (and DDPM noise) with the file's c_latent:
  per-step latents/eps, samples, decoded (from the file's samples), the uint8 image of
  the whole chain and the cropped ``output_*.png``.

Each stage is isolated where the file holds its inputs, so a failure points at one stage;
the stream and image checks are end to end. Nothing about a particular case is built
in: sizes, steps and timesteps are read from the files (the DDIM step count S is the one
whose official timestep rule reproduces the stored timesteps).

Tolerances: integer arrays, tables and bytes exactly; float arrays within 1e-4 relative
(max abs diff / max(max |ref|, 1e-3)); sampler outputs within 2e-3 relative (DDPM
amplifies float32 noise up to ~15x); uint8 images within 1 level (truncation boundaries).

Exit status: 0 if every check passes, 1 if any fails, 2 for an unusable folder
(missing config/checkpoints/context, unreadable or mismatched model files).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from export.checkpoints import CheckpointError
from export.config import ConfigError
from export.reference import FIXTURE_FILES, ReferencePipeline
from runtime.sampler import ddim_timesteps

log = logging.getLogger(__name__)

__all__ = [
    "Check", "FLOAT_REL_TOL", "SAMPLER_REL_TOL", "REL_FLOOR", "U8_TOL", "STAGES",
    "UnusableFolder", "find_cases", "verify", "main",
]

FLOAT_REL_TOL = 1e-4
SAMPLER_REL_TOL = 2e-3
# Relative errors divide by max(max |ref|, REL_FLOOR) so an all-zero reference does not
# turn float32 noise into an infinite relative error.
REL_FLOOR = 1e-3
U8_TOL = 1
STAGES: tuple[str, ...] = ("tables", "vae", "lfgcm", "stream", "unet_eps", "ddim", "ddpm")
_MODEL_FILES = ("config", "sd", "lc", "context")


class UnusableFolder(Exception):
    """The folder cannot be verified at all (exit status 2)."""


@dataclass
class Check:
    """One compared key of one stage."""

    case: str
    stage: str
    key: str
    kind: str  # "float", "exact", "u8", "bytes", "error"
    max_abs: float
    rel: float | None
    tol: float
    passed: bool
    note: str = ""

    def row(self) -> list[str]:
        if self.kind == "float":
            tol = f"{self.tol:.0e} rel"
        elif self.kind == "u8":
            tol = f"<= {int(self.tol)} level"
        elif self.kind == "error":
            tol = "-"
        else:
            tol = "exact"
        max_abs = "-" if self.kind == "error" else f"{self.max_abs:.3g}"
        rel = "-" if self.rel is None else f"{self.rel:.2e}"
        return [self.case, self.stage, self.key, max_abs, rel, tol, "PASS" if self.passed else "FAIL", self.note]


# ---------------------------------------------------------------------------- comparisons


def _arr(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def compare_float(case: str, stage: str, key: str, got: Any, ref: Any, tol: float = FLOAT_REL_TOL) -> Check:
    g, r = _arr(got), _arr(ref)
    if g.shape != r.shape:
        return Check(case, stage, key, "float", float("inf"), None, tol, False, f"shape {g.shape} != {r.shape}")
    if r.size == 0:
        return Check(case, stage, key, "float", 0.0, 0.0, tol, True)
    diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
    max_abs = float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf")
    rel = max_abs / max(float(np.abs(r.astype(np.float64)).max()), REL_FLOOR)
    return Check(case, stage, key, "float", max_abs, rel, tol, bool(rel <= tol))


def compare_exact(case: str, stage: str, key: str, got: Any, ref: Any) -> Check:
    g, r = _arr(got), _arr(ref)
    if g.shape != r.shape:
        return Check(case, stage, key, "exact", float("inf"), None, 0, False, f"shape {g.shape} != {r.shape}")
    ne = g != r
    n = int(np.count_nonzero(ne))
    max_abs = float(np.abs(g.astype(np.float64) - r.astype(np.float64)).max()) if g.size else 0.0
    return Check(case, stage, key, "exact", max_abs, None, 0, n == 0, f"{n} of {r.size} differ" if n else "")


def compare_u8(case: str, stage: str, key: str, got: Any, ref: Any, tol: int = U8_TOL) -> Check:
    g, r = _arr(got), _arr(ref)
    if g.shape != r.shape:
        return Check(case, stage, key, "u8", float("inf"), None, tol, False, f"shape {g.shape} != {r.shape}")
    diff = np.abs(g.astype(np.int16) - r.astype(np.int16))
    max_abs = int(diff.max()) if diff.size else 0
    n = int(np.count_nonzero(diff))
    return Check(case, stage, key, "u8", float(max_abs), None, tol, max_abs <= tol,
                 f"{n} of {r.size} values differ" if n else "")


def compare_bytes(case: str, stage: str, key: str, got: bytes, ref: bytes) -> Check:
    n = min(len(got), len(ref))
    g = np.frombuffer(got[:n], np.uint8)
    r = np.frombuffer(ref[:n], np.uint8)
    differ = int(np.count_nonzero(g != r)) + abs(len(got) - len(ref))
    note = f"{len(got)} vs {len(ref)} bytes" + (f", {differ} differ" if differ else ", identical")
    return Check(case, stage, key, "bytes", float(differ), None, 0, differ == 0, note)


# ---------------------------------------------------------------------------- folders


def _has_model_files(folder: Path) -> bool:
    return (folder / FIXTURE_FILES["config"]).is_file()


def _is_case(folder: Path) -> bool:
    return (folder / "input.png").is_file() or any(folder.glob("*.npz"))


def find_cases(root: Path) -> list[tuple[Path, Path]]:
    """``(case folder, weights folder)`` for the root and every sub-folder holding
    ``input.png`` or ``.npz`` files; the weights folder is the nearest one (the case itself
    or a parent up to ``root``) that has a ``config.yaml``."""
    root = root.resolve()
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    out: list[tuple[Path, Path]] = []
    for folder in folders:
        if not _is_case(folder):
            continue
        w = folder
        while not _has_model_files(w) and w != root:
            w = w.parent
        if not _has_model_files(w):
            raise UnusableFolder(
                f"{folder}: no {FIXTURE_FILES['config']} in this folder or any parent up to {root}"
            )
        missing = [FIXTURE_FILES[k] for k in _MODEL_FILES if not (w / FIXTURE_FILES[k]).is_file()]
        if missing:
            raise UnusableFolder(f"{w}: model files missing: {missing} (needed for case {folder})")
        out.append((folder, w))
    return out


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _load_png(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------- stages


class _Case:
    """Everything one case folder provides, plus lazily computed pipeline results."""

    def __init__(self, folder: Path, root: Path, pipe: ReferencePipeline) -> None:
        self.folder = folder
        rel = folder.relative_to(root)
        self.name = "." if str(rel) == "." else str(rel)
        self.pipe = pipe
        self.input = _load_png(folder / "input.png")
        self.npz = {n: _load_npz(folder / f"{n}.npz") for n in ("entropy_tables", "vae", "lfgcm", "unet_eps", "ddim", "ddpm")}
        self.stream = (folder / "stream.bin").read_bytes() if (folder / "stream.bin").is_file() else None
        meta = folder / "meta.json"
        try:
            self.meta: dict[str, Any] = json.loads(meta.read_text()) if meta.is_file() else {}
        except (OSError, ValueError):
            self.meta = {}
        self._control: torch.Tensor | None = None
        self._compressed: dict[str, Any] | None = None

    # Inputs: prefer what the files hold, so that each stage is checked in isolation.

    def original_hw(self, fallback: tuple[int, int]) -> tuple[int, int]:
        if self.input is not None:
            return int(self.input.shape[0]), int(self.input.shape[1])
        hw = self.meta.get("input_hw")
        if isinstance(hw, list) and len(hw) == 2:
            return int(hw[0]), int(hw[1])
        return fallback

    def own_control(self) -> torch.Tensor | None:
        if self._control is None and self.input is not None:
            self._control, _ = self.pipe.preprocess(self.input)
        return self._control

    def control(self) -> torch.Tensor | None:
        lf = self.npz["lfgcm"]
        if lf is not None and "control" in lf:
            return torch.from_numpy(lf["control"])
        return self.own_control()

    def compressed(self) -> dict[str, Any] | None:
        if self._compressed is None:
            control = self.own_control()
            if control is None:
                return None
            self._compressed = self.pipe.compress(control)
        return self._compressed

    def c_latent(self) -> Any:
        lf = self.npz["lfgcm"]
        if lf is not None and "c_latent" in lf:
            return lf["c_latent"]
        if self.stream is not None:
            return self.pipe.decompress(self.stream)["c_latent"]
        comp = self.compressed()
        if comp is None:
            raise ValueError("no c_latent: needs lfgcm.npz, stream.bin or input.png")
        return comp["c_latent"]


FLOAT_LFGCM = ("y", "z", "z_hat", "hyper_params", "y_hat", "f_c", "c_latent")
EXACT_LFGCM = ("z_symbols", "y_symbols", "y_indexes")


def stage_tables(c: _Case) -> Iterable[Check]:
    ref = c.npz["entropy_tables"]
    if ref is None:
        return
    for key in sorted(ref):
        if key not in c.pipe.tables:
            yield Check(c.name, "tables", key, "error", 0, None, 0, False, "not produced by build_tables")
            continue
        yield compare_exact(c.name, "tables", key, c.pipe.tables[key], ref[key])


def stage_vae(c: _Case) -> Iterable[Check]:
    ref = c.npz["vae"]
    if ref is None:
        return
    control = c.own_control() if c.own_control() is not None else c.control()
    if control is not None and ("moments" in ref or "z_g" in ref):
        enc = c.pipe.vae_encode(control)
        for key in ("moments", "z_g"):
            if key in ref:
                yield compare_float(c.name, "vae", key, enc[key], ref[key])
    if "scale_factor" in ref:
        yield compare_exact(c.name, "vae", "scale_factor", np.float32(c.pipe.cfg.scale_factor), ref["scale_factor"])
    if "decoded" in ref and "z_g" in ref:
        yield compare_float(c.name, "vae", "decoded", c.pipe.vae_decode(ref["z_g"]), ref["decoded"])


def stage_lfgcm(c: _Case) -> Iterable[Check]:
    ref = c.npz["lfgcm"]
    if ref is None:
        return
    own = c.own_control()
    if own is not None and "control" in ref:
        yield compare_float(c.name, "lfgcm", "control", own, ref["control"])
    control = c.control()
    if control is None:
        yield Check(c.name, "lfgcm", "-", "error", 0, None, 0, False, "no control: needs input.png or lfgcm.npz control")
        return
    if "z_g" in ref:
        # For cases without vae.npz this is the only check of the VAE encoder.
        yield compare_float(c.name, "lfgcm", "z_g", c.pipe.vae_encode(control)["z_g"], ref["z_g"])
        z_g = torch.from_numpy(ref["z_g"])
    else:
        z_g = c.pipe.vae_encode(control)["z_g"]
    out = c.pipe.lfgcm.compress_symbols(control, z_g, c.pipe._medians, c.pipe._scale_table)
    params = sorted((k for k in ref if k.startswith("params_")), key=lambda k: (k.rsplit("_", 1)[0], int(k.rsplit("_", 1)[1])))
    for key in (*FLOAT_LFGCM, *params):
        if key in ref:
            yield compare_float(c.name, "lfgcm", key, out[key], ref[key]) if key in out else Check(
                c.name, "lfgcm", key, "error", 0, None, 0, False, "not produced by compress_symbols")
    for key in EXACT_LFGCM:
        if key in ref:
            yield compare_exact(c.name, "lfgcm", key, out[key], ref[key])


def stage_stream(c: _Case) -> Iterable[Check]:
    if c.stream is None:
        return
    if c.input is not None:
        comp = c.compressed()
        assert comp is not None
        yield compare_bytes(c.name, "stream", "encode(input.png)==stream.bin", comp["stream"], c.stream)
    dec = c.pipe.decompress(c.stream)
    lf = c.npz["lfgcm"]
    if lf is not None:
        if "y_symbols" in lf:
            yield compare_exact(c.name, "stream", "decode:y_symbols", dec["y_symbols"], lf["y_symbols"])
        if "z_symbols" in lf:
            # The decoder yields z_hat = symbols + medians; recover the integers from it.
            med = c.pipe._medians.view(1, -1, 1, 1)
            z_sym = torch.round(dec["z_hat"] - med).to(torch.int32)
            yield compare_exact(c.name, "stream", "decode:z_symbols", z_sym, lf["z_symbols"])
        for key in ("z_hat", "y_hat", "c_latent"):
            if key in lf:
                yield compare_float(c.name, "stream", f"decode:{key}", dec[key], lf[key])
    elif c.input is not None:
        comp = c.compressed()
        assert comp is not None
        yield compare_float(c.name, "stream", "decode:c_latent", dec["c_latent"], comp["c_latent"])


def stage_unet_eps(c: _Case) -> Iterable[Check]:
    ref = c.npz["unet_eps"]
    if ref is None:
        return
    c_latent = c.c_latent()
    got = np.stack([c.pipe.eps(ref["x_t"][k], int(ref["t"][k]), c_latent) for k in range(len(ref["t"]))])
    yield compare_float(c.name, "unet_eps", "eps", got, ref["eps"])


def ddim_step_count(timesteps: Sequence[int], num_timesteps: int) -> int | None:
    """The official S whose DDIM rule walks exactly ``timesteps`` (sampling order), or None.

    Tries S = len(timesteps) first (the usual case), then every other S (the official
    rule can take more steps than S, e.g. S = 6 runs 7)."""
    target = [int(t) for t in timesteps]
    n = len(target)
    for s in [n] + [s for s in range(1, num_timesteps + 1) if s != n]:
        stride = num_timesteps // s
        # len(range(0, T, T // S)) must be n; skip the others without building them.
        if -(-num_timesteps // stride) != n:
            continue
        try:
            ts = ddim_timesteps(s, num_timesteps)
        except ValueError:
            continue  # S for which the official rule fails (see runtime.sampler.ddim_timesteps)
        if ts[::-1].tolist() == target:
            return s
    return None


def _stage_sampler(c: _Case, name: str) -> Iterable[Check]:
    ref = c.npz[name]
    if ref is None:
        return
    if "x_T" not in ref or "timesteps" not in ref:
        yield Check(c.name, name, "-", "error", 0, None, 0, False, f"{name}.npz lacks x_T or timesteps")
        return
    T = c.pipe.schedule.num_timesteps
    stored = [int(t) for t in ref["timesteps"]]
    if name == "ddim":
        steps = ddim_step_count(stored, T)
        if steps is None:
            yield Check(c.name, name, "timesteps", "error", 0, None, 0, False,
                        f"no DDIM step count S reproduces the timesteps {stored}")
            return
    else:
        steps = len(stored)
    smp = c.pipe.make_sampler(name, steps)
    yield compare_exact(c.name, name, f"timesteps(S={steps})", smp.timesteps, ref["timesteps"])
    coef = {"ddim": ("ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas"),
            "ddpm": ("betas", "posterior_variance")}[name]
    for key in coef:
        if key in ref:
            yield compare_float(c.name, name, key, getattr(smp, key), ref[key])
    noise = ref.get("noise") if name == "ddpm" else None
    out = c.pipe.sample(c.c_latent(), name, steps, ref["x_T"], noise)
    for key in ("x_steps", "eps_steps", "pred_x0_steps", "samples"):
        if key in ref:
            yield compare_float(c.name, name, key, out[key], ref[key], SAMPLER_REL_TOL)
    if "decoded" in ref:
        # Decode the file's samples: checks the VAE decoder apart from the sampler.
        src = ref["samples"] if "samples" in ref else out["samples"]
        yield compare_float(c.name, name, "decoded", c.pipe.vae_decode(src), ref["decoded"])
    png = _load_png(c.folder / f"output_{name}.png")
    if "image_u8" in ref or png is not None:
        # End to end: our own samples, decoded and post-processed.
        decoded = c.pipe.vae_decode(out["samples"])
        if "image_u8" in ref:
            yield compare_u8(c.name, name, "image_u8", c.pipe.to_image(decoded), ref["image_u8"])
        if png is not None:
            hw = c.original_hw(png.shape[:2])
            yield compare_u8(c.name, name, f"output_{name}.png", c.pipe.to_image(decoded, hw), png)


def stage_ddim(c: _Case) -> Iterable[Check]:
    return _stage_sampler(c, "ddim")


def stage_ddpm(c: _Case) -> Iterable[Check]:
    return _stage_sampler(c, "ddpm")


_STAGE_FUNCS: dict[str, Callable[[_Case], Iterable[Check]]] = {
    "tables": stage_tables, "vae": stage_vae, "lfgcm": stage_lfgcm, "stream": stage_stream,
    "unet_eps": stage_unet_eps, "ddim": stage_ddim, "ddpm": stage_ddpm,
}


def _run_stage(c: _Case, stage: str) -> list[Check]:
    try:
        return list(_STAGE_FUNCS[stage](c))
    except Exception as exc:  # a crash in one stage is that stage's FAIL, not the end of the report
        log.debug("stage %s of %s failed", stage, c.name, exc_info=True)
        return [Check(c.name, stage, "-", "error", 0, None, 0, False, f"{type(exc).__name__}: {exc}")]


def verify(root: str | Path, stages: Sequence[str] = STAGES) -> list[Check]:
    """Run every present stage of every case under ``root``. Raises UnusableFolder."""
    root = Path(root)
    if not root.is_dir():
        raise UnusableFolder(f"{root}: not a directory")
    if not _has_model_files(root.resolve()):
        raise UnusableFolder(f"{root}: no {FIXTURE_FILES['config']}: not a reference fixture folder")
    cases = find_cases(root)
    if not cases:
        raise UnusableFolder(f"{root}: no input.png or .npz reference files to check")
    pipes: dict[Path, ReferencePipeline] = {}
    checks: list[Check] = []
    for folder, weights in cases:
        if weights not in pipes:
            try:
                pipes[weights] = ReferencePipeline.from_fixture(weights)
            except (ConfigError, CheckpointError, ValueError, OSError) as exc:
                raise UnusableFolder(f"{weights}: cannot load the model: {exc}") from exc
        case = _Case(folder, root.resolve(), pipes[weights])
        for stage in stages:
            checks.extend(_run_stage(case, stage))
    return checks


# ---------------------------------------------------------------------------- report


def _worst(checks: list[Check]) -> Check:
    failed = [c for c in checks if not c.passed]
    if failed:
        return failed[0]

    def score(c: Check) -> float:
        if c.rel is not None:
            return c.rel / c.tol if c.tol else c.rel
        return c.max_abs / c.tol if c.tol else c.max_abs

    return max(checks, key=score)


def format_report(checks: list[Check], per_stage: bool = False) -> str:
    """The table: one line per compared key, or (``per_stage``) the worst key of each stage."""
    rows = checks
    if per_stage:
        groups: dict[tuple[str, str], list[Check]] = {}
        for ch in checks:
            groups.setdefault((ch.case, ch.stage), []).append(ch)
        rows = []
        for group in groups.values():
            w = _worst(group)
            n_fail = sum(not g.passed for g in group)
            note = f"{len(group)} keys" + (f", {n_fail} FAIL" if n_fail else "") + (f"; {w.note}" if w.note else "")
            rows.append(Check(w.case, w.stage, w.key, w.kind, w.max_abs, w.rel, w.tol,
                              n_fail == 0, note))
    header = ["case", "stage", "key", "max_abs", "rel", "tolerance", "result", "note"]
    table = [header] + [r.row() for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + ("  " + r[-1] if r[-1] else "")
             for r in table]
    n_fail = sum(not c.passed for c in checks)
    lines.append(f"{len(checks)} checks, {len(checks) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.verify_reference",
        description="Compare the PyTorch reference pipeline with a folder of official DiffEIC intermediates.",
    )
    parser.add_argument("fixture_dir", type=Path, help="folder with config.yaml, sd.ckpt, lc.ckpt, null_context.npy, npz files")
    parser.add_argument("--steps-only", action="store_true",
                        help="print one line per stage (its worst key) instead of one line per compared key")
    parser.add_argument("--stage", action="append", choices=STAGES, default=None,
                        help="check only this stage (repeatable); default: every stage whose files exist")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failing stages)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        checks = verify(args.fixture_dir, args.stage or STAGES)
    except UnusableFolder as exc:
        print(f"error: unusable reference folder: {exc}", file=sys.stderr)
        return 2
    print(format_report(checks, per_stage=args.steps_only))
    print(f"time: {time.perf_counter() - t0:.1f} s")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
