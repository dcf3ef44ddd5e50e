"""Runtime settings as one frozen value, with one defaults function.

Everything a run can be told (backend, threads, sampler, steps, coder format,
container, seed, memory budget and VAE tiling) lives here so the CLIs, the pipeline and the service share one
definition and one set of defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

BACKENDS = ("ort", "trt")
SAMPLERS = ("ddpm", "ddim", "dpmpp")
CODER_FORMATS = ("compat", "native")
CONTAINERS = ("native", "reference")
ENTROPY_PATHS = ("reference", "portable")


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str = "ort"
    threads: int = 0  # 0: all cores the process may use
    sampler: str = "ddpm"  # the official default: spaced DDPM, fixed_small variance
    steps: int = 50
    coder_format: str = "compat"  # rANS stream format inside the container
    container: str = "native"  # "native" (DEIC) or "reference" (official write_body)
    seed: int = 231  # the official default seed
    entropy_path: str = "reference"  # "portable": integer context model (docs/portable-entropy.md)
    verify_hashes: bool = True
    max_memory_mb: int = 0  # memory budget of one encode/decode; 0: 90 % of physical memory
    tile: int = 0  # VAE tiles: 0 automatic (above the budget), -1 never, N: N-pixel tiles (multiple of 64)

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("backend", self.backend, BACKENDS), ("sampler", self.sampler, SAMPLERS),
            ("coder_format", self.coder_format, CODER_FORMATS), ("container", self.container, CONTAINERS),
            ("entropy_path", self.entropy_path, ENTROPY_PATHS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        if not (0 < self.steps < 1 << 16):
            raise ValueError(f"steps must be in 1..65535, got {self.steps}")
        if not (0 <= self.seed < 1 << 64):
            raise ValueError(f"seed must be in 0..2**64-1, got {self.seed}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.max_memory_mb < 0:
            raise ValueError(f"max_memory_mb must be >= 0 (0: automatic), got {self.max_memory_mb}")
        if self.tile not in (-1, 0):
            from .tiling import check_tile

            check_tile(self.tile)

    def with_(self, **changes: Any) -> "RuntimeConfig":
        """A copy with the given fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def n_threads(self) -> int:
        if self.threads:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1


# Steps a sampler runs when none are given: the official 50 for DDPM/DDIM; DPM-Solver++
# is a few-step solver (the runtime accepts 10..25 for it, see runtime.sampler.DPMPP_STEPS).
DEFAULT_STEPS = {"ddpm": 50, "ddim": 50, "dpmpp": 20}


def default_steps(sampler: str) -> int:
    """The step count used for ``sampler`` when neither the caller nor the stream gives one."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    return DEFAULT_STEPS[sampler]


def defaults() -> RuntimeConfig:
    """The one place default settings come from."""
    return RuntimeConfig()
