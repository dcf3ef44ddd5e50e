"""ONNX export (export/to_onnx.py, python -m export) against PyTorch and the golden fixture.

One export of the fixture checkpoints per session (the dynamo exporter, ~2 CPU-minutes
for the 27 graphs) is shared by all checks; the random-init and bad-input tests use
the fast TorchScript exporter on a few graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from export.__main__ import (
    Models,
    export_artifacts,
    load_models,
    main,
    random_models,
    select_specs,
)
from export.config import load_config
from export.specs import PixelProfile
from export.tables import TABLE_KEYS
from export.to_onnx import example_inputs, graph_modules
from runtime.manifest import load_manifest, verify_file

ort = pytest.importorskip("onnxruntime")
log = logging.getLogger(__name__)
TOL = 1e-4


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _session(path: Path) -> "ort.InferenceSession":
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Graphs:
    """ORT sessions of one artifact directory, created on first use."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._s: dict[str, ort.InferenceSession] = {}

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name not in self._s:
            self._s[name] = _session(self.dir / f"{name}.onnx")
        return self._s[name].run(None, feeds)


# ---------------------------------------------------------------- session export


@pytest.fixture(scope="session")
def exported(fixture_artifacts: Path) -> Path:
    """The session's one export of the fixture checkpoints (tests/conftest.py), shared with the runtime tests."""
    return fixture_artifacts


@pytest.fixture(scope="session")
def models(fixture_dir: Path) -> Models:
    cfg = load_config(fixture_dir / "config.yaml")
    return load_models(cfg, fixture_dir / "sd.ckpt", fixture_dir / "lc.ckpt", fixture_dir / "null_context.npy")


@pytest.fixture(scope="session")
def graphs(exported: Path) -> Graphs:
    return Graphs(exported)


@pytest.fixture(scope="session")
def modules(models: Models) -> tuple[dict, dict]:
    specs = select_specs(models)
    return specs, graph_modules(specs, models.lfgcm, models.vae, models.controlled_unet)


# ---------------------------------------------------------------- manifest


def test_manifest_and_hashes(exported: Path, models: Models) -> None:
    man, d = load_manifest(exported)
    slices = len(models.cfg.lfgcm["slice_ch"])
    want = {"image_encoder", "vae_encoder", "lfgcm_analysis", "hyper_decoder", "content_decoder", "control_unet",
            "control", "unet", "vae_decoder"}
    want |= {f"ctx_anchor_{i}" for i in range(slices)} | {f"ctx_nonanchor_{i}" for i in range(slices)}
    assert set(man.networks) == want
    for name, e in man.networks.items():
        verify_file(d, e.file, e.sha256, name)
        for f, h in zip(e.external_data, e.external_sha256, strict=True):
            verify_file(d, f, h, name)
        assert e.external_data == ()  # tiny graphs are far below the protobuf limit
        axes = {s for t in e.inputs + e.outputs for s in t.shape if isinstance(s, str)}
        assert set(e.profile) == axes, name
    verify_file(d, man.tables_file, man.tables_sha256, "tables")
    assert man.opset == 18
    assert man.versions["exporter"] == "dynamo"
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(man.versions)
    assert man.fingerprint == models.fingerprint
    m = man.model
    assert (m["M"], m["N"], m["slice_ch"]) == (40, 32, [2, 2, 2, 2, 4, 4, 4, 4, 8, 8])
    assert (m["latent_channels"], m["content_channels"]) == (4, 4)
    assert m["scale_factor"] == pytest.approx(0.18215)
    assert m["schedule"] == {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
    assert m["profile"] == {"min_hw": [64, 64], "opt_hw": [512, 768], "max_hw": [2048, 2048]}
    assert man.networks["image_encoder"].profile["H"] == (64, 512, 2048)
    assert man.networks["unet"].profile["h8/4"] == (2, 16, 64)
    # The ONNX graphs carry the spec's axis names, so TensorRT profiles can use them.
    import onnx

    g = onnx.load(str(d / "control_unet.onnx"), load_external_data=False).graph
    assert [dd.dim_param or dd.dim_value for dd in g.input[0].type.tensor_type.shape.dim] == [1, 4, "h8", "w8"]


def test_tables_exact(exported: Path, fixture_dir: Path) -> None:
    with np.load(exported / "tables.npz") as got, np.load(fixture_dir / "entropy_tables.npz") as ref:
        for k in TABLE_KEYS:
            assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
        ac = got["alphas_cumprod"]
    sd = torch.load(fixture_dir / "sd.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert ac.dtype == np.float32 and np.array_equal(ac, sd["alphas_cumprod"].numpy())


# ---------------------------------------------------------------- ORT vs PyTorch


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (1, 2)], ids=["128x192", "192x128", "64x128"])
def test_graphs_match_torch(graphs: Graphs, modules: tuple[dict, dict], grid: tuple[int, int]) -> None:
    """Every graph under ORT equals its PyTorch module, at the fixture size and through the
    dynamic axes at other sizes (including a 1x2 z grid)."""
    specs, mods = modules
    errs = {}
    for k, (name, spec) in enumerate(specs.items()):
        inputs = example_inputs(spec, *grid, seed=k)
        with torch.no_grad():
            ref = mods[name](*inputs)
        ref = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        got = graphs.run(name, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})
        errs[name] = max(rel_err(g, r) for g, r in zip(got, ref, strict=True))
    log.info("ORT vs torch at z grid %s: worst %s", grid, max(errs.items(), key=lambda kv: kv[1]))
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, bad


def test_control_unet_golden(graphs: Graphs, fixture_dir: Path) -> None:
    u = np.load(fixture_dir / "unet_eps.npz")
    c = np.load(fixture_dir / "lfgcm.npz")["c_latent"]
    for k in range(len(u["t"])):
        t = np.array([u["t"][k]], dtype=np.float32)
        eps = graphs.run("control_unet", {"x_t": u["x_t"][k], "t": t, "c_latent": c})[0]
        assert rel_err(eps, u["eps"][k]) < TOL, (k, int(u["t"][k]))


def test_pipeline_golden(graphs: Graphs, fixture_dir: Path) -> None:
    """image_encoder, hyper_decoder, content_decoder and vae_decoder on the fixture arrays."""
    lf = dict(np.load(fixture_dir / "lfgcm.npz"))
    vae = dict(np.load(fixture_dir / "vae.npz"))
    y, z = graphs.run("image_encoder", {"image": lf["control"]})
    hp, f_c = graphs.run("hyper_decoder", {"z_hat": lf["z_hat"]})
    c = graphs.run("content_decoder", {"y_hat": lf["y_hat"], "f_c": lf["f_c"]})[0]
    dec = graphs.run("vae_decoder", {"latent": vae["z_g"]})[0]
    p0 = graphs.run("ctx_anchor_0", {"hyper_params": lf["hyper_params"]})[0]
    z_g = graphs.run("vae_encoder", {"image": lf["control"]})[0]  # the two halves of image_encoder
    y2, z2 = graphs.run("lfgcm_analysis", {"image": lf["control"], "z_g": z_g})
    errs = {"y": rel_err(y, lf["y"]), "z": rel_err(z, lf["z"]), "z_g": rel_err(z_g, vae["z_g"]),
            "y (two halves)": rel_err(y2, lf["y"]), "z (two halves)": rel_err(z2, lf["z"]), "hyper_params": rel_err(hp, lf["hyper_params"]),
            "f_c": rel_err(f_c, lf["f_c"]), "c_latent": rel_err(c, lf["c_latent"]),
            "decoded": rel_err(dec, vae["decoded"]), "params_anchor_0": rel_err(p0, lf["params_anchor_0"])}
    assert all(e < TOL for e in errs.values()), errs


def test_split_equals_merged(graphs: Graphs, modules: tuple[dict, dict], fixture_dir: Path) -> None:
    specs, _ = modules
    u = np.load(fixture_dir / "unet_eps.npz")
    c = np.load(fixture_dir / "lfgcm.npz")["c_latent"]
    for k in range(len(u["t"])):
        feeds = {"x_t": u["x_t"][k], "t": np.array([u["t"][k]], dtype=np.float32), "c_latent": c}
        merged = graphs.run("control_unet", feeds)[0]
        res = graphs.run("control", feeds)
        names = [t.name for t in specs["control"].outputs]
        split = graphs.run("unet", {"x_t": feeds["x_t"], "t": feeds["t"], **dict(zip(names, res, strict=True))})[0]
        assert rel_err(split, merged) < 1e-5


# ---------------------------------------------------------------- random init (fast exporter)


def test_random_init_tiny(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    rc = main(["--preset", "tiny", "--random-init", "--seed", "3", "--out", str(out), "--exporter", "torchscript",
               "--skip-split", "--graphs", "control_unet,vae_decoder,hyper_decoder", "-q"])
    assert rc == 0
    man, d = load_manifest(out)
    assert set(man.networks) == {"control_unet", "vae_decoder", "hyper_decoder"}
    assert man.model["random_init"] is True and man.versions["exporter"] == "torchscript"
    for name, e in man.networks.items():
        verify_file(d, e.file, e.sha256, name)
    m = random_models(load_config("tiny"), 3)
    assert m.fingerprint == man.fingerprint  # seeded: reproducible
    specs = select_specs(m, skip_split=True)
    spec = specs["control_unet"]
    mod = graph_modules({"control_unet": spec}, m.lfgcm, m.vae, m.controlled_unet)["control_unet"]
    g = Graphs(d)
    for grid in ((2, 3), (1, 2)):
        x = example_inputs(spec, *grid)
        with torch.no_grad():
            ref = mod(*x).numpy()
        got = g.run("control_unet", {t.name: v.numpy() for t, v in zip(spec.inputs, x)})[0]
        assert rel_err(got, ref) < TOL
        assert ref.std() > 0.05  # non-trivial: no zero-initialised layer silences the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temp dir left


# ---------------------------------------------------------------- bad inputs


def _fails(capsys: pytest.CaptureFixture, argv: list[str], out: Path, *needles: str) -> str:
    rc = main(argv + ["--out", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    line = err.splitlines()[-1]
    assert line.startswith("error: ")
    for n in needles:
        assert n in line, line
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))
    return line


def test_unknown_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fails(capsys, ["--preset", "huge", "--random-init"], tmp_path / "o", "huge", "paper", "tiny")
    _fails(capsys, ["--config", "huge", "--random-init"], tmp_path / "o", "paper", "tiny")


def test_truncated_checkpoint(tmp_path: Path, fixture_dir: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "sd.ckpt"
    bad.write_bytes((fixture_dir / "sd.ckpt").read_bytes()[:4096])
    _fails(capsys, ["--sd", str(bad), "--lc", str(fixture_dir / "lc.ckpt"), "--config", str(fixture_dir / "config.yaml"),
                    "--null-context", str(fixture_dir / "null_context.npy")], tmp_path / "o", str(bad), "unreadable")


def test_config_does_not_match_checkpoint(tmp_path: Path, fixture_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    raw = yaml.safe_load((fixture_dir / "config.yaml").read_text())
    pp = raw["params"]["preprocess_config"]["params"]
    pp["M"] = 48
    pp["slice_ch"] = pp["slice_ch"][:-1] + [16]  # still a valid config, just not this checkpoint's
    cfg = tmp_path / "m48.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    common = ["--sd", str(fixture_dir / "sd.ckpt"), "--lc", str(fixture_dir / "lc.ckpt"),
              "--null-context", str(fixture_dir / "null_context.npy")]
    _fails(capsys, common + ["--config", str(cfg)], tmp_path / "o", "does not fit", "--config")
    # The SD checkpoint given as lc.ckpt, and a null context of the wrong width.
    _fails(capsys, ["--sd", str(fixture_dir / "sd.ckpt"), "--lc", str(fixture_dir / "sd.ckpt"), "--config",
                    str(fixture_dir / "config.yaml"), "--null-context", str(fixture_dir / "null_context.npy")],
           tmp_path / "o", "control_model")
    np.save(tmp_path / "ctx.npy", np.zeros((1, 77, 1024), np.float32))
    _fails(capsys, common[:4] + ["--config", str(fixture_dir / "config.yaml"), "--null-context",
                                 str(tmp_path / "ctx.npy")], tmp_path / "o", "(1, 77, 64)")


def test_missing_null_context(tmp_path: Path, fixture_dir: Path, capsys: pytest.CaptureFixture) -> None:
    _fails(capsys, ["--sd", str(fixture_dir / "sd.ckpt"), "--lc", str(fixture_dir / "lc.ckpt"), "--config",
                    str(fixture_dir / "config.yaml")], tmp_path / "o", "--null-context")


def test_refuses_nonempty_out_and_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["--preset", "tiny", "--random-init", "--exporter", "torchscript", "--graphs", "hyper_decoder",
            "--out", str(out), "-q"]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert main(argv + ["--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import export.__main__ as cli

    real = cli.export_network
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated exporter crash")
        return real(*a, **k)

    monkeypatch.setattr(cli, "export_network", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        export_artifacts(tmp_path / "o", config="tiny", random_init=True, exporter="torchscript",
                         graphs=["hyper_decoder", "vae_decoder"], profile=PixelProfile())
    assert list(tmp_path.iterdir()) == []


def test_external_data_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """A failing dynamo export falls back to TorchScript (logged); forced external data
    gives one ``<graph>.onnx.data`` file that ORT loads (the path the 3.5 GB UNet takes)."""
    import export.to_onnx as to_onnx

    def broken(*a, **k):
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(to_onnx, "_export_dynamo", broken)
    m = random_models(load_config("tiny"), 1)
    specs = select_specs(m, skip_split=True, graphs=["vae_decoder"])
    spec = specs["vae_decoder"]
    mod = graph_modules(specs, m.lfgcm, m.vae, m.controlled_unet)["vae_decoder"]
    with caplog.at_level(logging.WARNING, logger="export.to_onnx"):
        res = to_onnx.export_network(mod, spec, example_inputs(spec, 2, 3), tmp_path / "vae_decoder.onnx",
                                     profile=PixelProfile(), external_data=True)
    assert res.exporter == "torchscript" and "falling back" in caplog.text
    assert [p.name for p in res.external_data] == ["vae_decoder.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    x = example_inputs(spec, 3, 2, seed=2)
    with torch.no_grad():
        ref = mod(*x).numpy()
    got = Graphs(tmp_path).run("vae_decoder", {"latent": x[0].numpy()})[0]
    assert rel_err(got, ref) < TOL
