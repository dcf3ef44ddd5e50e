"""Opt-in (``-m slow``): export the paper-size control+UNet (3.5 GB, random weights) and run one
step under ONNX Runtime against PyTorch. Checks the external-data path (one data file next
to the graph, hashed in the manifest) that only graphs over the protobuf limit take.

Also checks the ONNX Runtime variant written by ``--ort-graphs`` (fused attention) through
the runtime's OrtBackend against the same PyTorch step.

Needs about 20 GiB of RAM and several CPU-minutes.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export.__main__ import random_models, select_specs, write_artifacts
from export.config import load_config
from export.specs import PixelProfile
from export.to_onnx import example_inputs, graph_modules
from runtime.backends.onnxruntime import OrtBackend
from runtime.config import RuntimeConfig
from runtime.manifest import load_manifest, verify_file

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


def test_paper_control_unet(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    t0 = time.perf_counter()
    models = random_models(load_config("paper"), seed=0)
    specs = select_specs(models, skip_split=True, graphs=["control_unet"])
    spec = specs["control_unet"]
    module = graph_modules(specs, models.lfgcm, models.vae, models.controlled_unet)["control_unet"]
    # 64x64 latent = 512x512 image: z grid 8x8.
    inputs = example_inputs(spec, 8, 8, seed=1)
    with torch.no_grad():
        ref = module(*inputs).numpy()
    log.info("paper models + torch step: %.1f s", time.perf_counter() - t0)

    out = tmp_path / "paper"
    out.mkdir()
    t0 = time.perf_counter()
    write_artifacts(models, out, PixelProfile(), 18, specs, ort_graphs=True)
    log.info("paper control_unet export: %.1f s", time.perf_counter() - t0)
    del models, module
    gc.collect()

    man, d = load_manifest(out)
    e = man.networks["control_unet"]
    assert e.external_data == ("control_unet.onnx.data",)
    verify_file(d, e.file, e.sha256, "control_unet")
    verify_file(d, e.external_data[0], e.external_sha256[0], "control_unet weights")
    assert (d / e.file).stat().st_size < 2**30 < (d / e.external_data[0]).stat().st_size

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(d / e.file), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})[0]
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    log.info("paper control_unet ORT vs torch: rel %.2e", err)
    assert err < 1e-4
    del sess
    gc.collect()

    # The ONNX Runtime variant (--ort-graphs: attention fused into MultiHeadAttention), run
    # the way the runtime runs it: OrtBackend picks control_unet.ort for "control_unet".
    fused = man.networks["control_unet.ort"]
    assert fused.file == "control_unet.ort.onnx" and fused.external_data == e.external_data
    verify_file(d, fused.file, fused.sha256, "control_unet.ort")
    backend = OrtBackend(man, d, RuntimeConfig())
    t0 = time.perf_counter()
    got = backend.run("control_unet", {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})["eps"]
    log.info("paper control_unet.ort step: %.1f s", time.perf_counter() - t0)
    assert backend.files["control_unet"] == "control_unet.ort.onnx"
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    log.info("paper control_unet.ort (fused attention) vs torch: rel %.2e", err)
    assert err < 1e-4
