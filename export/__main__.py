"""``python -m export``: checkpoints -> artifact directory (ONNX graphs, tables, manifest).

This module owns the export job: load the config (file or preset) and the checkpoints
(safely, strictly), or build random weights (``--random-init``); fold the empty-prompt
context into the cross-attention; build the entropy tables and the sampler schedule
(``tables.npz``); export every network of :func:`export.specs.network_specs`; and write
``manifest.json`` (:class:`runtime.manifest.Manifest`). Output is atomic: everything is
written into ``DIR.tmp-<pid>`` and renamed to ``DIR`` at the end; on any failure the
temporary directory is removed. :func:`export_artifacts` is the Python entry point the
CLI (and the tests, and the job scripts) call.

Usage::

    python -m export --sd SD.ckpt --lc LC.ckpt [--config CONFIG.yaml|PRESET] \\
        [--null-context CTX.npy] --out DIR [--opset 18] \\
        [--profile-min H W --profile-opt H W --profile-max H W] [--skip-split] [--force]
    python -m export --preset tiny --random-init --seed N --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, NetworkEntry, sha256_file
from runtime.sampler import Schedule

from .checkpoints import CheckpointError, extract, load_state_dict_file, require_parts
from .config import PRESETS, ConfigError, DiffEICConfig, load_config
from .memory import memory_model
from .models.lfgcm import LFGCM, load_lfgcm
from .models.sd import load_control, load_unet, load_vae
from .models.text import CONTEXT_LENGTH, empty_prompt_context
from .models.unet import ControlledUNet, ControlModule, UNetModel
from .models.vae import AutoencoderKL
from .specs import NetworkSpec, PixelProfile, network_specs
from .tables import TABLE_KEYS, build_tables
from .to_onnx import (ORT_SUFFIX, ExportError, example_grid, example_inputs, export_network, graph_modules,
                      residual_channels, write_ort_graph)

log = logging.getLogger("export")

TABLES_NAME = "tables.npz"


class UsageError(ValueError):
    """Bad command-line arguments or input files (reported as one line, exit code 2)."""


@dataclass
class Models:
    """Everything exported, in eval mode, float32, context folded."""

    cfg: DiffEICConfig
    lfgcm: LFGCM
    vae: AutoencoderKL
    controlled_unet: ControlledUNet
    null_context: torch.Tensor
    fingerprint: str
    random_init: bool


# =========================================================================== models

def model_fingerprint(cfg: DiffEICConfig, modules: Mapping[str, nn.Module], null_context: torch.Tensor) -> str:
    """sha256 over the config fingerprint, every weight tensor (name, dtype, shape, bytes) in
    sorted name order, and the null context bytes. Call before folding the context."""
    h = hashlib.sha256()
    h.update(cfg.fingerprint().encode())
    state: dict[str, torch.Tensor] = {}
    for prefix, m in modules.items():
        for k, v in m.state_dict().items():
            state[f"{prefix}.{k}"] = v
    for k in sorted(state):
        v = state[k].detach().cpu()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        # Hash the raw buffer without a bytes copy (the paper UNet is 3.5 GB); reshape
        # first because 0-dim tensors cannot be viewed as bytes.
        if v.numel():
            h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    h.update(null_context.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_context(ctx: np.ndarray, cfg: DiffEICConfig, where: str) -> torch.Tensor:
    want = (1, CONTEXT_LENGTH, int(cfg.unet["context_dim"]))
    if tuple(ctx.shape) != want:
        raise UsageError(f"{where}: null context has shape {tuple(ctx.shape)}, expected {want} "
                         f"(1, 77, context_dim of the config)")
    if not np.issubdtype(ctx.dtype, np.floating) or not np.all(np.isfinite(ctx)):
        raise UsageError(f"{where}: null context must be finite floats, got dtype {ctx.dtype}")
    return torch.from_numpy(np.ascontiguousarray(ctx, dtype=np.float32))


def load_null_context(path: str | Path, cfg: DiffEICConfig) -> torch.Tensor:
    """A (1, 77, context_dim) float32 ``.npy`` (the empty-prompt embedding)."""
    try:
        arr = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the null context ({exc})") from exc
    return _check_context(arr, cfg, str(path))


def _check_schedule(sd_state: Mapping[str, torch.Tensor], cfg: DiffEICConfig, where: str) -> None:
    # The SD checkpoint carries its DDPM schedule buffers; a config with another schedule
    # would make the runtime sample with wrong alphas.
    ac = sd_state.get("alphas_cumprod")
    if ac is None:
        return
    ours = Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps).alphas_cumprod_f32()
    theirs = ac.detach().to(torch.float32).numpy().reshape(-1)
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-5, atol=0):
        raise CheckpointError(
            f"{where}: the checkpoint's alphas_cumprod ({theirs.shape[0]} steps) does not match the config "
            f"schedule (linear {cfg.linear_start}..{cfg.linear_end}, {cfg.timesteps} steps). "
            "Check that --config matches the checkpoint."
        )


def _finish(cfg: DiffEICConfig, unet: UNetModel, control: ControlModule, vae: AutoencoderKL, lfgcm: LFGCM,
            ctx: torch.Tensor, random_init: bool) -> Models:
    for m in (unet, control, vae, lfgcm):
        m.float().eval().requires_grad_(False)
    fp = model_fingerprint(cfg, {"unet": unet, "control": control, "vae": vae, "lfgcm": lfgcm}, ctx)
    cu = ControlledUNet(unet, control).eval()
    cu.fold_context(ctx)
    return Models(cfg, lfgcm, vae, cu, ctx, fp, random_init)


@torch.no_grad()
def load_models(cfg: DiffEICConfig, sd_path: str | Path, lc_path: str | Path,
                null_context: str | Path | None = None) -> Models:
    """Load SD (UNet + VAE) and DiffEIC lc (control + LFGCM) checkpoints strictly for ``cfg``."""
    log.info("reading %s", sd_path)
    sd = load_state_dict_file(sd_path, cfg)
    require_parts(sd, ["unet", "vae"], f"{sd_path} (--sd)")
    log.info("reading %s", lc_path)
    lc = load_state_dict_file(lc_path)
    require_parts(lc, ["control", "lfgcm"], f"{lc_path} (--lc)")
    _check_schedule(sd, cfg, f"{sd_path} (--sd)")
    if null_context is not None:
        ctx = load_null_context(null_context, cfg)
    elif any(k.startswith("cond_stage_model.") for k in sd):
        log.info("computing the empty-prompt context from the checkpoint's text encoder")
        try:
            ctx = _check_context(empty_prompt_context(extract(sd, "text")).numpy(), cfg, f"{sd_path} text encoder")
        except (KeyError, ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"{sd_path}: cannot compute the empty-prompt context ({exc}); "
                                  "pass --null-context FILE.npy") from exc
    else:
        raise UsageError(f"{sd_path} has no text encoder weights (cond_stage_model.*), so the empty-prompt "
                         "context cannot be computed; pass --null-context FILE.npy (shape (1, 77, context_dim))")
    log.info("building models")
    unet = load_unet(sd, cfg)
    vae = load_vae(sd, cfg)
    del sd  # the paper UNet is 3.5 GB: free the state dict once copied into the modules
    control = load_control(lc, cfg)
    lfgcm = load_lfgcm(lc, cfg, where=f"{lc_path} (preprocess_model.*)")
    del lc
    return _finish(cfg, unet, control, vae, lfgcm, ctx, random_init=False)


def _reinit_zero_layers(root: nn.Module) -> int:
    """Default-initialise every layer whose weight is all zeros (the official zero convs,
    ResBlock out convs, proj_out, UNet out conv), so random models give non-trivial output."""
    n = 0
    for m in root.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and hasattr(m, "reset_parameters") and w.numel() and not torch.any(w):
            m.reset_parameters()
            n += 1
    return n


@torch.no_grad()
def random_models(cfg: DiffEICConfig, seed: int, null_context: str | Path | None = None) -> Models:
    """Models of ``cfg`` with seeded default init and a random N(0,1) null context."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, control = UNetModel(cfg.unet), ControlModule(cfg.control)
        vae, lfgcm = AutoencoderKL(cfg.vae, cfg.scale_factor), LFGCM.from_config(cfg)
        n = sum(_reinit_zero_layers(m) for m in (unet, control, vae, lfgcm))
        ctx = (load_null_context(null_context, cfg) if null_context is not None
               else torch.randn(1, CONTEXT_LENGTH, int(cfg.unet["context_dim"])))
    log.info("random weights (seed %d, %d zero layers re-initialised)", seed, n)
    return _finish(cfg, unet, control, vae, lfgcm, ctx, random_init=True)


# =========================================================================== artifacts

def build_tables_dict(models: Models) -> dict[str, np.ndarray]:
    """Entropy tables (fixture key names) plus the model's float32 ``alphas_cumprod``."""
    tables = build_tables(models.lfgcm.entropy_bottleneck)
    cfg = models.cfg
    tables["alphas_cumprod"] = Schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps).alphas_cumprod_f32()
    return tables


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with path.open("wb") as f:  # a file object keeps numpy from appending '.npz'
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def _network_profile(spec: NetworkSpec, profile: PixelProfile) -> dict[str, tuple[int, int, int]]:
    # Only the axes this network uses; "h8/2"-style residual axes divide the base axis.
    axes = profile.axes()
    out: dict[str, tuple[int, int, int]] = {}
    for t in spec.inputs + spec.outputs:
        for d in t.shape:
            if isinstance(d, str) and d not in out:
                base, _, div = d.partition("/")
                f = int(div) if div else 1
                out[d] = tuple(v // f for v in axes[base])  # type: ignore[assignment]
    return out


def _versions(exporters: Mapping[str, str]) -> dict[str, str]:
    import onnx
    import onnxruntime

    fallback = sorted(n for n, e in exporters.items() if e != "dynamo")
    if not fallback:
        kind = "dynamo"
    elif len(fallback) == len(exporters):
        kind = "torchscript"
    else:
        kind = "dynamo; torchscript for " + ",".join(fallback)
    v = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
         "python": platform.python_version(), "numpy": np.__version__, "exporter": kind}
    try:
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    except ImportError:  # only the dynamo exporter needs it
        pass
    return v


def model_info(models: Models, profile: PixelProfile) -> dict[str, object]:
    """The manifest's ``model`` mapping: the sizes the runtime needs."""
    cfg = models.cfg
    lf = cfg.lfgcm
    return {
        "M": int(lf["M"]), "N": int(lf["N"]), "slice_ch": [int(c) for c in lf["slice_ch"]],
        "latent_channels": int(cfg.unet["in_channels"]), "content_channels": int(lf["out_nc"]),
        "scale_factor": float(cfg.scale_factor),
        "schedule": {"linear_start": float(cfg.linear_start), "linear_end": float(cfg.linear_end),
                     "timesteps": int(cfg.timesteps)},
        "profile": {"min_hw": list(profile.min_hw), "opt_hw": list(profile.opt_hw), "max_hw": list(profile.max_hw)},
        "random_init": bool(models.random_init),
    }


def write_portable_params(models: Models, directory: Path, tables: Mapping[str, np.ndarray]) -> dict[str, object]:
    """Calibrate the integer entropy path on the bundled photos and write ``portable.npz``."""
    from .portable import PORTABLE_FORMAT_VERSION, calibrate_portable, calibration_images, calibration_samples, write_portable

    log.info("calibrating the portable entropy path")
    samples = calibration_samples(models.vae, calibration_images())
    params = calibrate_portable(models.lfgcm, samples, medians=tables["eb_medians"], scale_table=tables["gc_scale_table"])
    name, sha = write_portable(params, directory)
    return {"file": name, "sha256": sha, "format_version": PORTABLE_FORMAT_VERSION}


def select_specs(models: Models, skip_split: bool = False, graphs: Iterable[str] | None = None
                 ) -> dict[str, NetworkSpec]:
    """The networks to export (all, minus control/unet with ``skip_split``, or ``graphs``)."""
    cfg = models.cfg
    res = None if skip_split else residual_channels(
        models.controlled_unet.control, int(cfg.unet["in_channels"]), int(cfg.control["hint_channels"]))
    specs = network_specs(cfg, res)
    if graphs is not None:
        wanted = list(graphs)
        unknown = [g for g in wanted if g not in specs]
        if unknown:
            raise UsageError(f"unknown network(s) {unknown}; available: {list(specs)}")
        specs = {k: v for k, v in specs.items() if k in wanted}
    return specs


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        if not out.is_dir():
            raise UsageError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            raise UsageError(f"{out} exists and is not empty; pass --force to replace it")


def write_artifacts(models: Models, directory: Path, profile: PixelProfile, opset: int = 18,
                    specs: Mapping[str, NetworkSpec] | None = None, exporter: str = "dynamo",
                    ort_graphs: bool = False) -> Manifest:
    """Export graphs, tables and manifest into an existing, empty ``directory``.

    ``ort_graphs`` also writes, for every graph with attention, ``<name>.ort.onnx`` (fused
    attention, ONNX Runtime only; same weights file) listed as network ``<name>.ort``,
    which the ORT backend prefers (see :func:`export.to_onnx.fuse_attention`)."""
    from tqdm import tqdm

    specs = specs if specs is not None else select_specs(models)
    tables = build_tables_dict(models)
    _save_npz(directory / TABLES_NAME, tables)
    info = model_info(models, profile)
    info["portable"] = write_portable_params(models, directory, tables)
    modules = graph_modules(specs, models.lfgcm, models.vae, models.controlled_unet)
    zh, zw = example_grid(profile)
    entries: dict[str, NetworkEntry] = {}
    exporters: dict[str, str] = {}
    bar = tqdm(list(specs.items()), desc="export", unit="graph", disable=None, leave=False)
    for name, spec in bar:
        bar.set_postfix_str(name)
        log.info("exporting %s", name)
        res = export_network(modules[name], spec, example_inputs(spec, zh, zw), directory / f"{name}.onnx",
                             opset, profile=profile, exporter=exporter)
        exporters[name] = res.exporter
        entries[name] = NetworkEntry(
            name=name, file=res.path.name, sha256=sha256_file(res.path),
            inputs=spec.inputs, outputs=spec.outputs, profile=_network_profile(spec, profile),
            external_data=tuple(p.name for p in res.external_data),
            external_sha256=tuple(sha256_file(p) for p in res.external_data),
            memory=memory_model(res.path),
        )
        ort_graph = write_ort_graph(res.path) if ort_graphs else None
        if ort_graph is not None:
            entries[name + ORT_SUFFIX] = replace(entries[name], name=name + ORT_SUFFIX, file=ort_graph.name,
                                                 sha256=sha256_file(ort_graph), memory=memory_model(ort_graph))
    bar.close()
    manifest = Manifest(
        format_version=FORMAT_VERSION, fingerprint=models.fingerprint, model=info,
        networks=entries, tables_file=TABLES_NAME, tables_sha256=sha256_file(directory / TABLES_NAME),
        opset=int(opset), versions=_versions(exporters),
    )
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def export_artifacts(
    out: str | Path,
    *,
    sd: str | Path | None = None,
    lc: str | Path | None = None,
    config: str | Path = "paper",
    null_context: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    opset: int = 18,
    profile: PixelProfile | None = None,
    skip_split: bool = False,
    graphs: Sequence[str] | None = None,
    exporter: str = "dynamo",
    force: bool = False,
    ort_graphs: bool = False,
) -> Path:
    """Export one artifact directory; returns its path.

    ``config`` is a YAML path or a preset name (``paper``, ``tiny``). Without
    ``random_init`` both ``sd`` and ``lc`` are required. ``graphs`` restricts the export
    to some networks (e.g. ``["control_unet"]``). Raises UsageError / ConfigError /
    CheckpointError before anything is written; on a later failure nothing is left
    behind. An existing non-empty ``out`` is replaced only with ``force``.
    """
    out = Path(out)
    if opset < 18:
        raise UsageError(f"--opset {opset}: opset 18 or newer is required")
    if exporter not in ("dynamo", "torchscript"):
        raise UsageError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    if random_init:
        if sd is not None or lc is not None:
            raise UsageError("--random-init builds random weights; do not pass --sd/--lc with it")
    elif sd is None or lc is None:
        raise UsageError("--sd and --lc are required (or --random-init for random weights)")
    try:
        profile = profile or PixelProfile()
    except ValueError as exc:
        raise UsageError(f"bad profile: {exc}") from exc
    _prepare_out(out, force)
    cfg = load_config(config)
    log.info("config %s (fingerprint %s)", cfg.source, cfg.fingerprint()[:12])
    models = random_models(cfg, seed, null_context) if random_init else load_models(cfg, sd, lc, null_context)  # type: ignore[arg-type]
    specs = select_specs(models, skip_split, graphs)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_artifacts(models, tmp, profile, opset, specs, exporter, ort_graphs)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d networks to %s", len(specs), out)
    return out


# =========================================================================== CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", type=Path, help="SD 2.1 checkpoint (.ckpt/.safetensors): UNet + VAE")
    p.add_argument("--lc", type=Path, help="DiffEIC lc.ckpt: control module + LFGCM")
    p.add_argument("--config", help=f"model YAML (official layout) or a preset name {sorted(PRESETS)}; default paper")
    p.add_argument("--preset", help=f"preset name {sorted(PRESETS)} (instead of --config)")
    p.add_argument("--null-context", type=Path, help="(1, 77, context_dim) float32 .npy empty-prompt context")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--opset", type=int, default=18)
    for k in ("min", "opt", "max"):
        p.add_argument(f"--profile-{k}", type=int, nargs=2, metavar=("H", "W"),
                       help=f"{k} padded image size in pixels (multiples of 64)")
    p.add_argument("--skip-split", action="store_true", help="do not export the separate control/unet graphs")
    p.add_argument("--graphs", help="comma-separated subset of networks to export")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--random-init", action="store_true", help="random weights instead of checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--ort-graphs", action="store_true",
                   help="also write ONNX Runtime graphs with fused attention (<name>.ort.onnx; faster on CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.preset is not None and args.config is not None:
            raise UsageError("pass either --preset or --config, not both")
        if args.preset is not None and args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; valid presets: {sorted(PRESETS)}")
        defaults = PixelProfile()
        try:
            profile = PixelProfile(
                tuple(args.profile_min or defaults.min_hw), tuple(args.profile_opt or defaults.opt_hw),
                tuple(args.profile_max or defaults.max_hw))
        except ValueError as exc:
            raise UsageError(f"bad profile: {exc}") from exc
        out = export_artifacts(
            args.out, sd=args.sd, lc=args.lc, config=args.preset or args.config or "paper",
            null_context=args.null_context, random_init=args.random_init, seed=args.seed, opset=args.opset,
            profile=profile, skip_split=args.skip_split,
            graphs=[g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None,
            exporter=args.exporter, force=args.force, ort_graphs=args.ort_graphs,
        )
    except (UsageError, ConfigError, CheckpointError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"error: export failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"exported {len(list(out.glob('*.onnx')))} graphs, {TABLES_NAME} and {MANIFEST_NAME} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
