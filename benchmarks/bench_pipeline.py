"""Stage-by-stage CPU benchmark of the DiffEIC runtime (ONNX Runtime) against the PyTorch
reference pipeline (:mod:`export.reference`), with the same random weights.

Artifacts (cached, made once under ``--cache``, default ``~/.cache/diffeic/<preset>-random``):

* ``onnx/``: ``python -m export --preset P --random-init --seed S --skip-split --out onnx``
  (run as a subprocess; its wall time, peak RSS and disk size go to ``export_stats.json``);
* ``ckpt/``: ``sd.ckpt`` (``model.diffusion_model.*``, ``first_stage_model.*``), ``lc.ckpt``
  (``control_model.*``, ``preprocess_model.*``) and ``null_context.npy``: the state dicts of
  :func:`export.__main__.random_models` with the same preset and seed, i.e. the very weights
  the export used (checked: the fingerprint of the saved models equals the manifest's).

Each side runs in its own subprocess (so ``peak_rss_mb`` is that side's own
``getrusage`` maximum) with the same thread count: load, then ``--repeats`` times a whole
encode and a whole decode with ``--steps`` DDPM steps, timed stage by stage. A third and
fourth subprocess per side run only one decode of the stream, for the peak memory of a
decode. Stages (seconds, median over repeats; wall and process-CPU time):

* ``image_encoder``: SD VAE encoder (mode, scaled) + LFGCM analysis;
* ``latent_coding``: z coding, hyper decoder, the 10 slices of y (encode side);
  the reference time is ``encode - image_encoder`` (its ``compress`` does both);
* ``latent_decoding``: the same on the decode side (rANS decode + context networks);
* ``content_decoder``: LFGCM decoder -> c_latent;
* ``control_unet_step``: one control + UNet evaluation (the denoise time / steps);
* ``vae_decoder``;
* ``encode``: whole encode (image -> bytes); ``decode``: whole decode with ``--steps`` steps;
* ``decode_50_steps_extrapolated``: ``decode + (50 - steps) * control_unet_step`` (not run).

Usage::

    python benchmarks/bench_pipeline.py                      # paper config, 512x768, 2 steps
    python benchmarks/bench_pipeline.py --quick              # paper config at 128x192
    python benchmarks/bench_pipeline.py --preset tiny --size 256x384
    python benchmarks/bench_pipeline.py --sides runtime --ort baseline   # ORT settings A/B

Writes ``--out`` (JSON: ``stages[name] = {runtime_s, reference_s, speedup, ...}``,
``peak_rss_mb``, environment, load average) and a PNG chart next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def _use_repo_sources() -> None:
    """Import ``export``/``runtime`` from this checkout even when an editable install of
    another checkout (scikit-build's redirecting finder) is active in the interpreter;
    the compiled ``runtime._rans`` then comes from this checkout's build folder."""
    sys.meta_path[:] = [f for f in sys.meta_path if "Redirecting" not in type(f).__name__]
    if str(REPO) in sys.path:
        sys.path.remove(str(REPO))
    sys.path.insert(0, str(REPO))
    if not list((REPO / "runtime").glob("_rans*.so")):
        builds = sorted(REPO.glob("build/*/_rans*.so"), key=lambda p: p.stat().st_mtime)
        if builds:
            import runtime

            runtime.__path__.append(str(builds[-1].parent))


_use_repo_sources()

log = logging.getLogger("bench_pipeline")

STAGES = ("image_encoder", "latent_coding", "latent_decoding", "content_decoder", "control_unet_step",
          "vae_decoder", "encode", "decode")
EXTRAPOLATE_STEPS = 50


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dir_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 2**20


def test_image(h: int, w: int, seed: int = 0) -> "Any":
    """A deterministic natural-ish uint8 image: smooth colour fields plus fine noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    low = rng.random((max(h // 32, 2), max(w // 32, 2), 3))
    ys = np.linspace(0, low.shape[0] - 1, h)
    xs = np.linspace(0, low.shape[1] - 1, w)
    yi, xi = np.clip(ys.astype(int), 0, low.shape[0] - 2), np.clip(xs.astype(int), 0, low.shape[1] - 2)
    fy, fx = (ys - yi)[:, None, None], (xs - xi)[None, :, None]
    img = (low[yi][:, xi] * (1 - fy) * (1 - fx) + low[yi + 1][:, xi] * fy * (1 - fx)
           + low[yi][:, xi + 1] * (1 - fy) * fx + low[yi + 1][:, xi + 1] * fy * fx)
    img = img * 220 + rng.normal(0, 8, img.shape) + 15
    return np.clip(img, 0, 255).astype(np.uint8)


# =========================================================================== artifacts

def prepare(cache: Path, preset: str, seed: int) -> dict[str, Any]:
    """Export (subprocess) and save the matching checkpoints, once; returns export stats."""
    onnx_dir, ckpt_dir, stats_path = cache / "onnx", cache / "ckpt", cache / "export_stats.json"
    cache.mkdir(parents=True, exist_ok=True)
    if not (onnx_dir / "manifest.json").is_file():
        cmd = [sys.executable, __file__, "--run-export", "--preset", preset, "--random-init", "--seed", str(seed),
               "--skip-split", "--ort-graphs", "--out", str(onnx_dir), "--force"]
        log.info("exporting: %s", " ".join(cmd))
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        wall = time.perf_counter() - t0
        stats = {"command": "python -m export " + " ".join(cmd[3:]), "wall_s": wall,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
                 "disk_mb": _dir_mb(onnx_dir)}
        stats_path.write_text(json.dumps(stats, indent=2))
    add_ort_graphs(onnx_dir)
    if not (ckpt_dir / "lc.ckpt").is_file():
        log.info("saving the matching random checkpoints to %s", ckpt_dir)
        subprocess.run([sys.executable, __file__, "--save-ckpt", str(ckpt_dir), "--preset", preset,
                        "--seed", str(seed), "--artifacts", str(onnx_dir)], cwd=REPO, check=True)
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    stats.setdefault("disk_mb", _dir_mb(onnx_dir))
    return stats


def add_ort_graphs(onnx_dir: Path) -> None:
    """Give an artifact dir exported without ``--ort-graphs`` its ``<name>.ort`` graphs."""
    from dataclasses import replace

    from export.to_onnx import ORT_SUFFIX, write_ort_graph
    from runtime.manifest import MANIFEST_NAME, load_manifest, sha256_file

    manifest, d = load_manifest(onnx_dir)
    if any(n.endswith(ORT_SUFFIX) for n in manifest.networks):
        return
    nets = dict(manifest.networks)
    for name in ("control_unet", "vae_decoder", "image_encoder"):
        e = nets.get(name)
        g = write_ort_graph(d / e.file) if e is not None else None
        if g is not None:
            nets[name + ORT_SUFFIX] = replace(e, name=name + ORT_SUFFIX, file=g.name, sha256=sha256_file(g))
            log.info("added %s", g.name)
    tmp = d / (MANIFEST_NAME + ".tmp")
    tmp.write_text(replace(manifest, networks=nets).to_json())
    tmp.replace(d / MANIFEST_NAME)


def save_checkpoints(out: Path, preset: str, seed: int, artifacts: Path) -> None:
    """The state dicts of ``random_models(preset, seed)`` in the official checkpoint layout."""
    import numpy as np
    import torch

    from export.__main__ import _reinit_zero_layers, model_fingerprint
    from export.checkpoints import PREFIXES
    from export.config import load_config
    from export.models.lfgcm import LFGCM
    from export.models.text import CONTEXT_LENGTH
    from export.models.unet import ControlModule, UNetModel
    from export.models.vae import AutoencoderKL
    from runtime.manifest import load_manifest

    # export.__main__.random_models without its last step (_finish folds the empty-prompt
    # K/V into the cross-attention and drops to_k/to_v, which a checkpoint must keep).
    # The fingerprint check below proves these are the weights the export used.
    cfg = load_config(preset)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, control = UNetModel(cfg.unet), ControlModule(cfg.control)
        vae, lfgcm = AutoencoderKL(cfg.vae, cfg.scale_factor), LFGCM.from_config(cfg)
        for m in (unet, control, vae, lfgcm):
            _reinit_zero_layers(m)
        ctx = torch.randn(1, CONTEXT_LENGTH, int(cfg.unet["context_dim"]))
    for m in (unet, control, vae, lfgcm):
        m.float().eval().requires_grad_(False)
    fingerprint = model_fingerprint(cfg, {"unet": unet, "control": control, "vae": vae, "lfgcm": lfgcm}, ctx)
    manifest, _ = load_manifest(artifacts)
    if manifest.fingerprint != fingerprint:
        raise SystemExit(f"random weights ({preset}, seed {seed}) fingerprint {fingerprint[:12]} does not match "
                         f"the exported artifacts ({manifest.fingerprint[:12]})")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, parts in (("sd.ckpt", {"unet": unet, "vae": vae}), ("lc.ckpt", {"control": control, "lfgcm": lfgcm})):
        state = {PREFIXES[p] + k: v for p, m in parts.items() for k, v in m.state_dict().items()}
        torch.save(state, tmp / name)
        del state
    np.save(tmp / "null_context.npy", ctx.numpy().astype(np.float32))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# =========================================================================== workers

class Clock:
    """Per-stage wall and process-CPU samples."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, stage: str, wall: float, cpu: float | None = None) -> None:
        self.wall.setdefault(stage, []).append(wall)
        if cpu is not None:
            self.cpu.setdefault(stage, []).append(cpu)

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        self.add(stage, time.perf_counter() - t0, time.process_time() - c0)
        return out

    def summary(self) -> dict[str, Any]:
        return {k: {"median_s": statistics.median(v), "min_s": min(v), "runs": v,
                    "cpu_median_s": statistics.median(self.cpu[k]) if self.cpu.get(k) else None}
                for k, v in self.wall.items()}


def _worker_runtime(args: argparse.Namespace, image: Any, clock: Clock, decode_only: bytes | None) -> bytes:
    from runtime.backends.onnxruntime import OrtBackend
    from runtime.config import RuntimeConfig
    from runtime.manifest import load_manifest
    from runtime.pipeline import Codec

    cfg = RuntimeConfig(threads=args.threads, steps=args.steps, verify_hashes=False)
    manifest, directory = load_manifest(args.artifacts)
    kwargs = {} if args.ort == "default" else OrtBackend.preset(args.ort)
    backend = OrtBackend(manifest, directory, cfg, **kwargs)
    codec = Codec(args.artifacts, cfg, backend=backend)
    calls: dict[str, list[float]] = {}  # network -> [wall, cpu] accumulated this round
    plain_run = backend.run

    def counted_run(network: str, inputs: dict[str, Any]) -> dict[str, Any]:
        c0, t0 = time.process_time(), time.perf_counter()
        out = plain_run(network, inputs)
        acc = calls.setdefault(network, [0.0, 0.0])
        acc[0] += time.perf_counter() - t0
        acc[1] += time.process_time() - c0
        return out

    backend.run = counted_run  # type: ignore[method-assign]
    if decode_only is not None:
        codec.decode(decode_only, steps=args.steps)
        return decode_only
    enc_nets = ["image_encoder", "hyper_decoder"] + [n for n in manifest.networks if n.startswith("ctx_")]
    dec_nets = ["content_decoder", "control_unet", "vae_decoder"]
    clock.timed("load", lambda: [backend.session(n) for n in enc_nets + dec_nets])
    data = b""
    for r in range(args.repeats + args.warmup):
        keep = r >= args.warmup
        calls.clear()
        c0, t0 = time.process_time(), time.perf_counter()
        enc = codec.encode(image)
        w, c = time.perf_counter() - t0, time.process_time() - c0
        data = enc.data
        c1, t1 = time.process_time(), time.perf_counter()
        dec = codec.decode(data, steps=args.steps)
        w2, c2 = time.perf_counter() - t1, time.process_time() - c1
        if not keep:
            continue
        clock.add("encode", w, c)
        clock.add("decode", w2, c2)
        # Stage wall times from the pipeline's own Timings; CPU times of the graph stages
        # from the per-network accounting (these stages are one network each).
        clock.add("image_encoder", enc.timings.stages["image_encoder"], calls["image_encoder"][1])
        clock.add("latent_coding", enc.timings.stages["latent_coding"])
        st = dec.timings.stages
        clock.add("latent_decoding", st["latent_decoding"])
        clock.add("content_decoder", st["content_decoder"], calls["content_decoder"][1])
        clock.add("control_unet_step", st["denoise"] / args.steps, calls["control_unet"][1] / args.steps)
        clock.add("vae_decoder", st["vae_decoder"], calls["vae_decoder"][1])
    log.info("runtime: %d bytes, %.4f bpp", len(data), len(data) * 8 / (image.shape[0] * image.shape[1]))
    return data


def _worker_reference(args: argparse.Namespace, image: Any, clock: Clock, decode_only: bytes | None) -> bytes:
    import numpy as np
    import torch

    from export.reference import ReferencePipeline
    from runtime import bitstream
    from runtime.entropy_coding import encode_with_indexes, encode_z

    torch.set_num_threads(args.threads)
    ck = Path(args.ckpt)
    pipe = clock.timed("load", lambda: ReferencePipeline.from_files(
        ck / "sd.ckpt", ck / "lc.ckpt", args.preset, ck / "null_context.npy"))
    rng = np.random.default_rng(args.seed)

    def decode(data: bytes, timed: bool) -> np.ndarray:
        t: Callable[[str, Callable[[], Any]], Any] = clock.timed if timed else (lambda _s, f: f())
        dec = t("latent_decoding+content_decoder", lambda: pipe.decompress(data))
        if timed:  # the content decoder alone, on the same inputs
            with torch.no_grad():
                clock.timed("content_decoder", lambda: pipe.lfgcm.content_decoder(dec["y_hat"], dec["f_c"]))
        shape = tuple(dec["c_latent"].shape)
        x_T = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal((args.steps,) + shape).astype(np.float32)
        c0, t0 = time.process_time(), time.perf_counter()
        out = pipe.sample(dec["c_latent"], "ddpm", args.steps, x_T, noise)
        if timed:
            clock.add("control_unet_step", (time.perf_counter() - t0) / args.steps,
                      (time.process_time() - c0) / args.steps)
        decoded = t("vae_decoder", lambda: pipe.vae_decode(out["samples"]))

        return pipe.to_image(decoded, bitstream.unpack(data).original_hw)

    if decode_only is not None:
        decode(decode_only, False)
        return decode_only
    data = b""
    for r in range(args.repeats + args.warmup):
        keep = r >= args.warmup
        stage: Callable[[str, Callable[[], Any]], Any] = clock.timed if keep else (lambda _s, f: f())
        c0, t0 = time.process_time(), time.perf_counter()
        # ReferencePipeline.encode_image, split so the image encoder is timed on its own:
        # preprocess, vae_encode, then compress()'s body without a second VAE pass.
        control, _ = pipe.preprocess(image)
        v = stage("vae_encode", lambda: pipe.vae_encode(control))
        with torch.no_grad():
            stage("lfgcm_analysis", lambda: pipe.lfgcm.analysis(control, v["z_g"]))
            out = pipe.lfgcm.compress_symbols(control, v["z_g"], pipe._medians, pipe._scale_table)
        y_string = encode_with_indexes(out["y_symbols"].numpy(), out["y_indexes"].numpy(), pipe.gaussian, "compat")
        z_string, _ = encode_z(out["z"][0].numpy(), pipe.bottleneck, "compat")
        data = bitstream.pack_reference(y_string, z_string, (int(out["z"].shape[2]), int(out["z"].shape[3])))
        w, c = time.perf_counter() - t0, time.process_time() - c0
        c1, t1 = time.process_time(), time.perf_counter()
        decode(data, keep)
        w2, c2 = time.perf_counter() - t1, time.process_time() - c1
        if keep:
            clock.add("encode_total_incl_extra_analysis", w, c)
            clock.add("decode_total_incl_extra_content_decoder", w2, c2)
    # The timed encode ran the LFGCM analysis twice (once alone, once inside
    # compress_symbols) and the decode the content decoder twice: take the extra runs out.
    wl, cl = clock.wall, clock.cpu
    n = len(wl["vae_encode"])
    for i in range(n):
        clock.cpu.setdefault("image_encoder", []).append(cl["vae_encode"][i] + cl["lfgcm_analysis"][i])
        clock.cpu.setdefault("encode", []).append(cl["encode_total_incl_extra_analysis"][i] - cl["lfgcm_analysis"][i])
        clock.cpu.setdefault("decode", []).append(
            cl["decode_total_incl_extra_content_decoder"][i] - cl["content_decoder"][i])
        enc_w = wl["encode_total_incl_extra_analysis"][i] - wl["lfgcm_analysis"][i]
        ie = wl["vae_encode"][i] + wl["lfgcm_analysis"][i]
        clock.add("encode", enc_w)
        clock.add("image_encoder", ie)
        clock.add("latent_coding", enc_w - ie)
        clock.add("decode", wl["decode_total_incl_extra_content_decoder"][i] - wl["content_decoder"][i])
        clock.add("latent_decoding", wl["latent_decoding+content_decoder"][i] - wl["content_decoder"][i])
    return data


def worker(args: argparse.Namespace) -> None:
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(v, str(args.threads))
    h, w = args.size
    image = test_image(h, w, args.seed)
    clock = Clock()
    fn = _worker_runtime if args.worker == "runtime" else _worker_reference
    decode_only = Path(args.decode_only).read_bytes() if args.decode_only else None
    t0 = time.perf_counter()
    data = fn(args, image, clock, decode_only)
    out = {"side": args.worker, "peak_rss_mb": _peak_rss_mb(), "wall_s": time.perf_counter() - t0,
           "loadavg": os.getloadavg(), "stages": clock.summary()}
    if args.stream_out:
        Path(args.stream_out).write_bytes(data)
    Path(args.result).write_text(json.dumps(out, indent=1))


# =========================================================================== driver

def _run_side(args: argparse.Namespace, side: str, tmp: Path, decode_only: Path | None = None) -> dict[str, Any]:
    result = tmp / f"{side}{'-decode' if decode_only else ''}.json"
    cmd = [sys.executable, __file__, "--worker", side, "--result", str(result), "--artifacts", str(args.artifacts),
           "--ckpt", str(args.ckpt), "--preset", args.preset, "--size", f"{args.size[0]}x{args.size[1]}",
           "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--seed", str(args.seed), "--ort", args.ort,
           "--stream-out", str(tmp / f"{side}.stream")]
    if decode_only is not None:
        cmd += ["--decode-only", str(decode_only)]
    log.info("%s%s: starting (load average %s)", side, " decode-only" if decode_only else "",
             " ".join(f"{x:.2f}" for x in os.getloadavg()))
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads(result.read_text())


def _size(s: str) -> tuple[int, int]:
    h, _, w = s.lower().partition("x")
    return int(h), int(w)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [k for k in list(STAGES) + [f"decode_{EXTRAPOLATE_STEPS}_steps_extrapolated"]
             if k in res["stages"] and res["stages"][k].get("reference_s") and res["stages"][k].get("runtime_s")]
    rt = [res["stages"][k]["runtime_s"] for k in names]
    rf = [res["stages"][k]["reference_s"] for k in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.bar(x - 0.2, rf, 0.4, label="PyTorch reference")
    ax.bar(x + 0.2, rt, 0.4, label="runtime (ONNX Runtime)")
    for i, k in enumerate(names):
        ax.text(x[i] + 0.2, rt[i], f"{res['stages'][k]['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("seconds (median, log scale)")
    c = res["config"]
    ax.set_title(f"DiffEIC CPU stages, {c['preset']} config, {c['size'][0]}x{c['size'][1]}, "
                 f"{c['threads']} threads, {c['steps']} steps run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-export"]:  # python -m export, with this checkout's sources
        from export.__main__ import main as export_main

        return export_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", choices=("paper", "tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=None, help="HxW image size (default 512x768; --quick 128x192)")
    p.add_argument("--steps", type=int, default=2, help="DDPM steps actually run in the timed decode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed encode+decode rounds first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="128x192, 2 repeats")
    p.add_argument("--cache", type=Path, help="artifact cache (default ~/.cache/diffeic/<preset>-random)")
    p.add_argument("--artifacts", type=Path, help="ONNX artifact dir (default <cache>/onnx)")
    p.add_argument("--ckpt", type=Path, help="checkpoint dir matching --artifacts (default <cache>/ckpt)")
    p.add_argument("--sides", default="runtime,reference")
    p.add_argument("--no-decode-rss", action="store_true", help="skip the decode-only peak-memory subprocesses")
    p.add_argument("--ort", default="fast", help="OrtBackend settings preset: default, baseline, fast")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_pipeline.json")
    # internal
    p.add_argument("--worker", choices=("runtime", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stream-out", help=argparse.SUPPRESS)
    p.add_argument("--decode-only", help=argparse.SUPPRESS)
    p.add_argument("--save-ckpt", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.save_ckpt:
        save_checkpoints(args.save_ckpt, args.preset, args.seed, args.artifacts)
        return 0
    if args.worker:
        worker(args)
        return 0
    if args.size is None:
        args.size = (128, 192) if args.quick else (512, 768)
    if args.quick and args.repeats == 3:
        args.repeats = 2
    cache = args.cache or Path.home() / ".cache/diffeic" / f"{args.preset}-random"
    export_stats: dict[str, Any] = {}
    if args.artifacts is None:
        export_stats = prepare(cache, args.preset, args.seed)
        args.artifacts = cache / "onnx"
    args.ckpt = args.ckpt or cache / "ckpt"
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as td:
        tmp = Path(td)
        for side in sides:
            results[side] = _run_side(args, side, tmp)
        if not args.no_decode_rss:
            for side in sides:
                r = _run_side(args, side, tmp, decode_only=tmp / f"{side}.stream")
                results[side]["decode_peak_rss_mb"] = r["peak_rss_mb"]
    stages: dict[str, dict[str, Any]] = {}
    names = list(STAGES) + ["load"]
    for k in names:
        row: dict[str, Any] = {}
        for side, key in (("runtime", "runtime"), ("reference", "reference")):
            s = results.get(side, {}).get("stages", {}).get(k)
            if s:
                row[f"{key}_s"] = s["median_s"]
                row[f"{key}_min_s"] = s["min_s"]
                if s.get("cpu_median_s") is not None:
                    row[f"{key}_cpu_s"] = s["cpu_median_s"]
        if row.get("runtime_s") and row.get("reference_s"):
            row["speedup"] = row["reference_s"] / row["runtime_s"]
            row["speedup_min"] = row["reference_min_s"] / row["runtime_min_s"]
        if row.get("runtime_cpu_s") and row.get("reference_cpu_s"):
            row["speedup_cpu"] = row["reference_cpu_s"] / row["runtime_cpu_s"]
        stages[k] = row
    ext = f"decode_{EXTRAPOLATE_STEPS}_steps_extrapolated"
    row = {}
    for key in ("runtime", "reference"):
        if f"{key}_s" in stages["decode"]:
            row[f"{key}_s"] = (stages["decode"][f"{key}_s"]
                               + (EXTRAPOLATE_STEPS - args.steps) * stages["control_unet_step"][f"{key}_s"])
    if len(row) == 2:
        row["speedup"] = row["reference_s"] / row["runtime_s"]
    row["note"] = f"not run: decode with {args.steps} steps + {EXTRAPOLATE_STEPS - args.steps} x control_unet_step"
    stages[ext] = row
    for side in sides:
        stages.setdefault("peak_rss_mb", {})[f"{side}_mb"] = results[side]["peak_rss_mb"]
        if "decode_peak_rss_mb" in results[side]:
            stages.setdefault("decode_peak_rss_mb", {})[f"{side}_mb"] = results[side]["decode_peak_rss_mb"]
    import onnxruntime
    import torch

    res = {
        "config": {"preset": args.preset, "size": list(args.size), "steps": args.steps, "repeats": args.repeats,
                   "warmup": args.warmup, "threads": args.threads, "seed": args.seed, "ort_settings": args.ort,
                   "artifacts": str(args.artifacts), "random_weights": True},
        "command": "python benchmarks/bench_pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "stages": stages,
        "export": export_stats,
        "raw": results,
        "environment": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__,
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    if "runtime" in results and "reference" in results:
        chart(res, args.out.with_suffix(".png"))
    w = max(len(k) for k in stages)
    print(f"{'stage':<{w}}  {'runtime_s':>10} {'reference_s':>11} {'speedup':>7} {'min':>6} {'cpu':>6}")
    for k, r in stages.items():
        if k.endswith("rss_mb"):
            print(f"{k:<{w}}  {r.get('runtime_mb', float('nan')):>10.0f} {r.get('reference_mb', float('nan')):>11.0f}")
            continue
        print(f"{k:<{w}}  {r.get('runtime_s', float('nan')):>10.3f} {r.get('reference_s', float('nan')):>11.3f} "
              f"{r.get('speedup', float('nan')):>7.2f} {r.get('speedup_min', float('nan')):>6.2f} "
              f"{r.get('speedup_cpu', float('nan')):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
