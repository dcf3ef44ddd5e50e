"""Bounded load test of the DiffEIC HTTP service on loopback (``runtime.serve``).

Runs, each with a fixed number of requests from N concurrent clients and a per-request
timeout (so nothing can hang):

* ``no_batching``: ``--max-batch 1``;
* ``batching``: ``--max-batch`` (default 4) with a short batching window;
* ``fault``: batching, ``--fault-replicas`` replicas, one replica actor killed with
  ``ray.kill`` after a fraction of the requests; clients retry 5xx/connection errors a
  bounded number of times. Reports failures, retries, and how long the service took to
  be back at full strength.

Every 200 response is checked against the local Codec's decode of the same stream.
Writes ``results.json`` and ``serve.png`` (latency percentiles, throughput, fault
timeline) to ``--out``.

    python benchmarks/bench_serve.py --engines ARTIFACT_DIR [--clients 8 --requests 48]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.config import defaults  # noqa: E402
from runtime.pipeline import Codec  # noqa: E402

log = logging.getLogger("bench_serve")
STREAM = {"content-type": "application/octet-stream"}


@dataclass
class Call:
    start: float  # seconds since the run began
    latency: float
    status: int  # final HTTP status, or 0 for a connection error / client timeout
    attempts: int
    batch: int = 0
    correct: bool | None = None


@dataclass
class RunResult:
    name: str
    settings: dict[str, Any]
    wall_s: float
    calls: list[Call] = field(default_factory=list)
    kill_at_s: float | None = None
    killed: str | None = None
    recovered_after_s: float | None = None

    def summary(self) -> dict[str, Any]:
        ok = [c for c in self.calls if c.status == 200]
        lat = np.array([c.latency for c in ok]) if ok else np.array([np.nan])
        codes: dict[str, int] = {}
        for c in self.calls:
            codes[str(c.status)] = codes.get(str(c.status), 0) + 1
        return {
            "name": self.name, "requests": len(self.calls), "ok": len(ok), "status_counts": codes,
            "retries": sum(c.attempts - 1 for c in self.calls),
            "wrong_outputs": sum(1 for c in ok if c.correct is False),
            "throughput_rps": len(ok) / self.wall_s if self.wall_s else 0.0, "wall_s": self.wall_s,
            "latency_s": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)} | {"max": float(lat.max())},
            "mean_batch": float(np.mean([c.batch for c in ok])) if ok else 0.0,
            "kill_at_s": self.kill_at_s, "killed": self.killed, "recovered_after_s": self.recovered_after_s,
            "settings": self.settings,
        }


def decode_call(url: str, data: bytes, timeout: float, retries: int) -> tuple[int, int, int, bytes]:
    """POST /decode with bounded retries on 503/5xx/connection errors; returns (status, attempts, batch, body)."""
    import requests

    status, body, batch = 0, b"", 0
    for attempt in range(1, retries + 2):
        try:
            r = requests.post(f"{url}/decode", data=data, headers=STREAM, timeout=timeout)
            status, body, batch = r.status_code, r.content, int(r.headers.get("x-diffeic-batch-size", 0))
        except requests.RequestException:
            status = 0
        if status == 200 or (400 <= status < 500):
            return status, attempt, batch, body
        if attempt <= retries:
            # Retry-After is whole seconds; a short back-off keeps a bounded test bounded.
            time.sleep(min(0.5 * attempt, 2.0))
    return status, retries + 1, batch, body


def run_load(name: str, url: str, streams: list[bytes], refs: list[np.ndarray], n_requests: int, clients: int,
             timeout: float, retries: int, settings: dict[str, Any], on_progress: Any = None) -> RunResult:
    res = RunResult(name, settings, 0.0)
    lock = threading.Lock()
    counter = iter(range(n_requests))
    done = [0]
    t0 = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            s = time.perf_counter()
            status, attempts, batch, body = decode_call(url, streams[k % len(streams)], timeout, retries)
            call = Call(s - t0, time.perf_counter() - s, status, attempts, batch)
            if status == 200:
                got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
                call.correct = bool(np.array_equal(got, refs[k % len(refs)]))
            with lock:
                res.calls.append(call)
                done[0] += 1
                n = done[0]
            if on_progress is not None:
                on_progress(n, t0)

    with ThreadPoolExecutor(clients) as ex:
        futs = [ex.submit(client) for _ in range(clients)]
        for f in futs:
            f.result(timeout=n_requests * (timeout + 5) * (retries + 1))  # a hard bound: nothing hangs
    res.wall_s = time.perf_counter() - t0
    res.calls.sort(key=lambda c: c.start)
    return res


def deploy(base: dict[str, Any], **changes: Any) -> tuple[str, dict[str, Any]]:
    from ray import serve as rserve

    from runtime import serve

    try:
        rserve.delete(serve.APP_NAME)
    except Exception:  # noqa: BLE001 - nothing deployed yet
        pass
    s = serve.ServeSettings(**{**base, **changes})
    url = serve.start(s)
    return url, {k: v for k, v in asdict(s).items() if k != "codec_factory"}


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    sums = [r.summary() for r in results]
    names = [s["name"] for s in sums]
    x = np.arange(len(names))
    for i, q in enumerate(("p50", "p95", "p99")):
        axes[0].bar(x + (i - 1) * 0.25, [s["latency_s"][q] for s in sums], 0.25, label=q)
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("latency of successful requests (s)")
    axes[0].legend()
    axes[0].set_title("latency")
    axes[1].bar(x, [s["throughput_rps"] for s in sums], color="tab:green")
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("successful requests / s")
    axes[1].set_title("throughput")
    fault = next((r for r in results if r.kill_at_s is not None), None)
    ax = axes[2]
    if fault is not None:
        for status, color in ((200, "tab:blue"), (0, "black")):
            pts = [c for c in fault.calls if c.status == status]
            ax.scatter([c.start for c in pts], [c.latency for c in pts], s=12, c=color, label=f"status {status or 'conn'}")
        other = [c for c in fault.calls if c.status not in (200, 0)]
        ax.scatter([c.start for c in other], [c.latency for c in other], s=18, c="tab:red", marker="x", label="other")
        retried = [c for c in fault.calls if c.attempts > 1]
        ax.scatter([c.start for c in retried], [c.latency for c in retried], s=60, facecolors="none",
                   edgecolors="tab:orange", label="retried")
        ax.axvline(fault.kill_at_s, color="tab:red", ls="--", label="replica killed")
        ax.set_xlabel("request start (s)")
        ax.set_ylabel("latency (s)")
        ax.legend(fontsize=8)
    ax.set_title("fault run: one replica killed mid-load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", required=True, help="artifact directory (e.g. the tiny random-init export)")
    p.add_argument("--out", default=str(REPO / "build" / "bench-serve"), help="output directory")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests per run (a fixed count: bounded)")
    p.add_argument("--streams", type=int, default=8, help="distinct streams (seeds) cycled through")
    p.add_argument("--size", default="64x64", help="image HxW")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--replicas", type=int, default=1, help="replicas in the batching comparison")
    p.add_argument("--fault-replicas", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per attempt, seconds")
    p.add_argument("--retries", type=int, default=3, help="client retries on 5xx / connection errors")
    p.add_argument("--kill-after", type=float, default=0.3, help="fraction of requests done before the kill")
    p.add_argument("--skip-fault", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import ray

    from runtime import serve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in args.size.lower().split("x"))
    codec = Codec(args.engines, defaults().with_(threads=1))
    rng = np.random.default_rng(0)
    streams = [codec.encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), steps=args.steps, seed=k).data
               for k in range(args.streams)]
    refs = [codec.decode(s).image for s in streams]
    log.info("reference decodes done (%d streams, %dx%d, %d steps)", len(streams), h, w, args.steps)

    os.environ.pop("RAY_ADDRESS", None)  # a private local instance on loopback (Ray's own ports too)
    serve.pin_ray_to_loopback()
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    base = dict(artifacts=str(Path(args.engines).resolve()), port=serve.free_port(), timeout_s=args.timeout,
                max_queued=max(32, args.clients * 2), batch_wait_ms=args.batch_wait_ms)
    results: list[RunResult] = []
    try:
        for name, mb in (("no_batching", 1), ("batching", args.max_batch)):
            url, st = deploy(base, replicas=args.replicas, max_batch=mb)
            decode_call(url, streams[0], args.timeout, args.retries)  # warm the HTTP path
            r = run_load(name, url, streams, refs, args.requests, args.clients, args.timeout, args.retries, st)
            results.append(r)
            log.info("%s: %s", name, json.dumps(r.summary()["latency_s"]))
        if not args.skip_fault:
            url, st = deploy(base, replicas=args.fault_replicas, max_batch=args.max_batch)
            decode_call(url, streams[0], args.timeout, args.retries)
            kill_state: dict[str, Any] = {}
            kill_lock = threading.Lock()

            def killer(n: int, t0: float) -> None:
                with kill_lock:
                    if kill_state or n < args.kill_after * args.requests:
                        return
                    names = serve.replica_actor_names()
                    kill_state.update(name=names[0], at=time.perf_counter() - t0, t=time.monotonic())
                ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
                log.info("killed %s at %.2f s", names[0], kill_state["at"])

            r = run_load("fault", url, streams, refs, args.requests, args.clients, args.timeout, args.retries,
                         st, on_progress=killer)
            r.kill_at_s, r.killed = kill_state.get("at"), kill_state.get("name")
            # Recovery: the controller replaces the dead replica; wait (bounded) for full strength.
            import requests

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                names = serve.replica_actor_names()
                healthy = requests.get(f"{url}/healthz", timeout=10).status_code == 200
                if healthy and len(names) == args.fault_replicas and r.killed not in names:
                    r.recovered_after_s = time.monotonic() - kill_state["t"]
                    break
                time.sleep(0.5)
            status, _, _, _ = decode_call(url, streams[0], args.timeout, 0)
            r.settings["post_recovery_status"] = status
            results.append(r)
            log.info("fault: %s", json.dumps(r.summary()))
    finally:
        serve.stop()

    report = {"machine": {"cpus": os.cpu_count()}, "clients": args.clients, "requests": args.requests,
              "size": [h, w], "steps": args.steps, "runs": [r.summary() for r in results],
              "calls": {r.name: [asdict(c) for c in r.calls] for r in results}}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "serve.png")
    for s in report["runs"]:
        lat = s["latency_s"]
        print(f"{s['name']:12s} ok {s['ok']}/{s['requests']} retries {s['retries']} wrong {s['wrong_outputs']} "
              f"{s['throughput_rps']:.2f} req/s p50 {lat['p50']:.3f} p95 {lat['p95']:.3f} p99 {lat['p99']:.3f} s "
              f"mean batch {s['mean_batch']:.2f} codes {s['status_counts']}"
              + (f" recovered after {s['recovered_after_s']:.1f} s" if s["recovered_after_s"] is not None else ""))
    print(f"wrote {out / 'results.json'} and {out / 'serve.png'}")
    bad = any(s["wrong_outputs"] for s in report["runs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
