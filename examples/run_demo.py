"""The main job: export the tiny preset with random weights (once), then encode and
decode a real photo with the runtime, printing bpp and per-stage timings.

    python examples/run_demo.py [--artifacts artifacts/tiny] [--steps 50] [--out out/]

Each step runs as its own process, exactly as a user would run the CLIs: the export
side (torch) and the runtime side (no torch) never share a process. With random
weights the decoded image is noise; see README "Running with the official checkpoints".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", default="artifacts/tiny")
    p.add_argument("--image", default=str(HERE / "coffee.png"))
    p.add_argument("--out", default="out")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    args = p.parse_args()
    art = Path(args.artifacts)
    if not (art / "manifest.json").is_file():
        sh("-m", "export", "--preset", "tiny", "--random-init", "--seed", "0", "--out", str(art))
    out = Path(args.out)
    stream = out / (Path(args.image).stem + ".deic")
    sh("-m", "runtime.encode", args.image, "-o", str(stream), "--engines", str(art),
       "--steps", str(args.steps), "--sampler", args.sampler)
    sh("-m", "runtime.decode", str(stream), "-o", str(out / (Path(args.image).stem + ".png")), "--engine", str(art))
    return 0


if __name__ == "__main__":
    sys.exit(main())
