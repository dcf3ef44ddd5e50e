"""The serving layer: batched decoding equals unbatched decoding, and the HTTP service on
loopback (the session's export of the fixture checkpoints) answers like the Codec and the CLI, refuses bad input
with JSON 4xx errors that carry the runtime's messages, and shuts down cleanly.

The artifacts are the session's single export (tests/conftest.py);
``DIFFEIC_TINY_ARTIFACTS`` points at an existing export instead. The HTTP tests need Ray Serve (``pip install "diffeic-runtime[serve]"``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from runtime import bitstream
from runtime.config import defaults
from runtime.pipeline import Codec
from runtime.serve import DecodeJob, ServeSettings, decode_many

REPO = Path(__file__).resolve().parents[1]
STREAM = {"content-type": "application/octet-stream"}
PNG = {"content-type": "image/png"}
STEPS = 2  # few steps: the tests check plumbing and identity, not quality


@pytest.fixture(scope="module")
def tiny_artifacts(fixture_artifacts: Path) -> Path:
    """The session's export of the fixture checkpoints (tests/conftest.py); DIFFEIC_TINY_ARTIFACTS overrides."""
    given = os.environ.get("DIFFEIC_TINY_ARTIFACTS")
    return Path(given) if given else fixture_artifacts


@pytest.fixture(scope="module")
def codec(tiny_artifacts: Path) -> Codec:
    return Codec(tiny_artifacts, defaults().with_(threads=1))


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_of(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def image_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ------------------------------------------------------------------ batched decoding, no Ray


def test_decode_many_equals_codec_decode(codec: Codec) -> None:
    streams = [codec.encode(random_image(h, w, k), steps=s, sampler=sm, seed=k).data
               for k, (h, w, s, sm) in enumerate([(64, 64, 2, "ddpm"), (60, 50, 2, "ddpm"), (64, 64, 2, "ddim"),
                                                  (64, 128, 2, "ddpm"), (64, 64, 4, "ddpm")])]
    jobs = [DecodeJob(s) for s in streams] + [DecodeJob(streams[1], steps=4), DecodeJob(b"garbage")]
    outcomes = decode_many(codec, jobs)
    # (64,64) ddpm 2 and (60,50) ddpm 2 share a latent shape: one loop of two.
    assert [o.batch_size for o in outcomes[:6]] == [2, 2, 1, 1, 2, 2]
    for job, out in zip(jobs[:6], outcomes[:6]):
        assert out.error is None
        assert np.array_equal(out.image, codec.decode(job.data, steps=job.steps).image)
    assert isinstance(outcomes[6].error, bitstream.BitstreamError)


def test_decode_many_drops_expired_jobs(codec: Codec) -> None:
    data = codec.encode(random_image(64, 64, 0), steps=STEPS).data
    late, live = DecodeJob(data, deadline=time.monotonic() - 1), DecodeJob(data)
    outcomes = decode_many(codec, [late, live])
    assert isinstance(outcomes[0].error, TimeoutError)
    assert np.array_equal(outcomes[1].image, codec.decode(data).image)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="replicas"):
        ServeSettings(artifacts="x", replicas=0)
    with pytest.raises(ValueError, match="backend"):
        ServeSettings(artifacts="x", backend="nope")


# ------------------------------------------------------------------ the HTTP service


@pytest.fixture(scope="module")
def service(tiny_artifacts: Path) -> Iterator[str]:
    ray = pytest.importorskip("ray", reason='Ray Serve is not installed (pip install "diffeic-runtime[serve]")')
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "diffeic-runtime[serve]")')
    pytest.importorskip("requests", reason="the HTTP tests use requests")
    from runtime import serve

    # A private local instance on loopback (Ray's own ports too), never a cluster named by RAY_ADDRESS.
    serve.pin_ray_to_loopback()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = ServeSettings(artifacts=str(tiny_artifacts), replicas=1, port=serve.free_port(), max_batch=4,
                             batch_wait_ms=100, timeout_s=120, max_bytes=1 << 20, max_pixels=256 * 256,
                             max_steps=100)
    try:
        yield serve.start(settings)
    finally:
        serve.stop()
    assert not ray.is_initialized()


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 120) -> Any:
    import requests

    return requests.post(url, data=body, headers=headers, timeout=timeout)


def test_healthz_and_openapi(service: str, codec: Codec) -> None:
    import requests

    r = requests.get(f"{service}/healthz", timeout=30)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["fingerprint"] == codec.manifest.fingerprint
    paths = requests.get(f"{service}/openapi.json", timeout=30).json()["paths"]
    assert {"/encode", "/decode", "/healthz"} <= set(paths)


def test_encode_decode_over_http_equals_codec_and_cli(service: str, codec: Codec, tiny_artifacts: Path,
                                                      tmp_path: Path) -> None:
    image = random_image(70, 90, 1)
    r = post(f"{service}/encode?steps={STEPS}&seed=7&sampler=ddpm", png_of(image), PNG)
    assert r.status_code == 200, r.text
    assert r.content == codec.encode(image, steps=STEPS, seed=7, sampler="ddpm").data
    d = post(f"{service}/decode", r.content, STREAM)
    assert d.status_code == 200, d.text
    assert d.headers["content-type"] == "image/png"
    got = image_of(d.content)
    assert np.array_equal(got, codec.decode(r.content).image)
    # The decode CLI on the same stream gives the same pixels.
    (tmp_path / "s.deic").write_bytes(r.content)
    cli = subprocess.run([sys.executable, "-m", "runtime.decode", str(tmp_path / "s.deic"), "-o", str(tmp_path / "o.png"),
                          "--engines", str(tiny_artifacts), "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert np.array_equal(got, image_of((tmp_path / "o.png").read_bytes()))
    # Query overrides reach the decoder.
    d2 = post(f"{service}/decode?steps=4&sampler=ddim", r.content, STREAM)
    assert d2.status_code == 200, d2.text
    assert np.array_equal(image_of(d2.content), codec.decode(r.content, steps=4, sampler="ddim").image)


def test_concurrent_decodes_are_batched_and_identical(service: str, codec: Codec) -> None:
    streams = [codec.encode(random_image(64, 64, 10 + k), steps=STEPS, seed=k).data for k in range(4)]
    results: list[Any] = [None] * len(streams)
    barrier = threading.Barrier(len(streams))

    def call(k: int) -> None:
        barrier.wait()
        results[k] = post(f"{service}/decode", streams[k], STREAM)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert all(r is not None and r.status_code == 200 for r in results), [getattr(r, "text", r) for r in results]
    for data, r in zip(streams, results):
        assert np.array_equal(image_of(r.content), codec.decode(data).image)
    assert max(int(r.headers["x-diffeic-batch-size"]) for r in results) > 1


def _runtime_message(codec: Codec, data: bytes) -> str:
    with pytest.raises(ValueError) as info:
        codec.parse(data)
    return str(info.value)


@pytest.mark.parametrize("case", ["empty", "png_to_decode", "random_to_decode", "random_to_encode", "truncated_stream",
                                  "wrong_type_decode", "wrong_type_encode", "no_type", "too_large", "too_many_pixels",
                                  "bad_query", "bad_sampler", "too_many_steps", "stream_asks_too_many_steps",
                                  "invalid_ddim_steps"])
def test_bad_input_gets_json_4xx(case: str, service: str, codec: Codec) -> None:
    good_png = png_of(random_image(64, 64, 3))
    stream = codec.encode(random_image(64, 64, 3), steps=STEPS).data
    junk = np.random.default_rng(5).bytes(300)
    cases: dict[str, tuple[str, bytes, dict[str, str], int, str | None]] = {
        # route, body, headers, status, expected message (None: just non-empty)
        "empty": ("/decode", b"", STREAM, 400, "request body is empty"),
        "png_to_decode": ("/decode", good_png, STREAM, 400, _runtime_message(codec, good_png)),
        "random_to_decode": ("/decode", junk, STREAM, 400, _runtime_message(codec, junk)),
        "random_to_encode": ("/encode", junk, PNG, 400, None),
        "truncated_stream": ("/decode", stream[:-7], STREAM, 400, _runtime_message(codec, stream[:-7])),
        "wrong_type_decode": ("/decode", stream, {"content-type": "text/plain"}, 415, None),
        "wrong_type_encode": ("/encode", good_png, {"content-type": "application/json"}, 415, None),
        "no_type": ("/decode", stream, {}, 415, None),
        "too_large": ("/decode", b"\0" * ((1 << 20) + 1), STREAM, 413, None),
        "too_many_pixels": ("/encode", png_of(np.zeros((300, 300, 3), np.uint8)), PNG, 413, None),
        "bad_query": ("/decode?steps=abc", stream, STREAM, 400, None),
        "bad_sampler": ("/encode?sampler=euler", good_png, PNG, 400, None),
        "too_many_steps": ("/decode?steps=100000", stream, STREAM, 400, None),
        "stream_asks_too_many_steps": ("/decode", codec.encode(random_image(64, 64, 3), steps=500).data, STREAM, 400,
                                       "the stream asks for 500 sampling steps"),
        "invalid_ddim_steps": ("/encode?sampler=ddim&steps=3", good_png, PNG, 400, "DDIM steps=3 is not supported"),
    }
    route, body, headers, status, message = cases[case]
    r = post(f"{service}{route}", body, headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    payload = r.json()
    assert payload["status"] == status and payload["error"] and payload["message"]
    if message is not None:
        assert message in payload["message"]


def test_service_survives_bad_input(service: str) -> None:
    import requests

    for body in (b"\xff" * 10, b"DEIC" + b"\0" * 100, b"\x00\x00\x00\x02" * 30):
        assert post(f"{service}/decode", body, STREAM).status_code == 400
    assert requests.get(f"{service}/healthz", timeout=30).status_code == 200


def test_metrics_are_exported(service: str) -> None:
    """The replica's ray.serve.metrics reach Ray's Prometheus export (best effort: the
    export port is only known through the node's metadata)."""
    import ray
    import requests

    node = next((n for n in ray.nodes() if n.get("Alive")), {})
    port = node.get("MetricsExportPort")
    if not port:
        pytest.skip("Ray reports no metrics export port on this node")
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text  # loopback only
        if "diffeic_requests" in text:
            break
        time.sleep(2)
    assert "diffeic_requests" in text and "diffeic_request_latency_s" in text, json.dumps(text[-500:])


class _SlowBackend:
    """Wraps a backend and sleeps in every denoising step: requests that are slow on purpose."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay, self.name = inner, delay, inner.name

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if network == "control_unet":
            time.sleep(self.delay)
        return self.inner.run(network, inputs)

    def has(self, network: str) -> bool:
        return self.inner.has(network)

    def close(self) -> None:
        self.inner.close()


def slow_codec(artifacts: str, cfg: Any) -> Codec:
    codec = Codec(artifacts, cfg)
    codec.backend = _SlowBackend(codec.backend, 0.25)
    return codec


@pytest.mark.slow
def test_timeout_and_backpressure(service: str, tiny_artifacts: Path, codec: Codec) -> None:
    """A second app with a slow codec, one request at a time and one queued: a long decode
    gets 504 at the timeout, and a burst gets 503 + Retry-After for what does not fit.
    (slow: a second deployment adds 10-15 s to the module.)"""
    from ray import cloudpickle
    from ray import serve as rserve

    from runtime import serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas cannot import the tests (Ray pickles with its own cloudpickle)
    port = int(service.rsplit(":", 1)[1])
    settings = ServeSettings(artifacts=str(tiny_artifacts), port=port, max_batch=1, max_ongoing=1, max_queued=1,
                             timeout_s=2, warmup=False, codec_factory=slow_codec)
    url = serve.start(settings, app_name="diffeic-slow", route_prefix="/slow")
    try:
        long = codec.encode(random_image(64, 64, 0), steps=40).data  # ~10 s of steps
        t0 = time.monotonic()
        r = post(f"{url}/decode", long, STREAM, timeout=60)
        assert r.status_code == 504 and r.json()["error"] == "Timeout", r.text
        assert time.monotonic() - t0 < 10
        short = codec.encode(random_image(64, 64, 1), steps=2).data
        results: list[Any] = []
        lock = threading.Lock()

        def call() -> None:
            r = post(f"{url}/decode", short, STREAM, timeout=60)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        codes = sorted(r.status_code for r in results)
        assert len(results) == 6 and set(codes) <= {200, 503}, codes
        assert 200 in codes and 503 in codes, codes
        assert all(r.headers.get("retry-after") for r in results if r.status_code == 503)
    finally:
        rserve.delete("diffeic-slow")
