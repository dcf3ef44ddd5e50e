"""Engine schema shared by the builder (``export.build_engines``) and the TensorRT backend.

Names of the sampler-step engines and their I/O, the per-step coefficient layout, how a
TensorRT version and a compute capability are written in the manifest, and the lazy
imports of TensorRT / cuda-python. Pure Python: importable without a GPU.
"""

from __future__ import annotations

import re
from typing import Any

SAMPLER_STEP_PREFIX = "sampler_step_"

# Per-step coefficient columns of the sampler-step engine, in table order. They are the
# float32 scalars of runtime.sampler's ``coefficients(i)`` (DDPM: the noise scale is the
# float32 product noise_mask * sqrt_variance, computed first exactly as torch associates it).
STEP_COEF_KEYS: dict[str, tuple[str, ...]] = {
    "ddpm": ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
             "posterior_mean_coef1", "posterior_mean_coef2", "noise_scale"),
    "ddim": ("sqrt_one_minus_a_t", "sqrt_a_t", "sqrt_a_prev", "dir_coef"),
    # DPM-Solver++ (2M): data prediction m = (x - sigma * eps) / alpha, then
    # x_next = (c_x * x - a * m) - half_a * (inv_r * (m - m_prev)); order-1 steps have
    # half_a = inv_r = 0. The step engine also outputs m as the next step's m_prev.
    "dpmpp": ("sigma", "alpha", "c_x", "a", "half_a", "inv_r"),
}


def trt_version_string(module_name: str, version: str) -> str:
    """How an engine's TensorRT is recorded: ``"<module>-<version>"`` (e.g. ``tensorrt-10.13.0.35``).

    The flavour matters: a TensorRT-RTX plan does not load in TensorRT and vice versa."""
    return f"{module_name}-{version}"


def normalize_cc(cc: str | int | tuple[int, int]) -> str:
    """Compute capability as ``"major.minor"`` from "8.9", "89", "sm_89", "SM89", 89 or (8, 9)."""
    if isinstance(cc, tuple):
        return f"{int(cc[0])}.{int(cc[1])}"
    s = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if re.fullmatch(r"\d+\.\d+", s):
        major, minor = s.split(".")
        return f"{int(major)}.{int(minor)}"
    if re.fullmatch(r"\d{2,3}", s):
        return f"{int(s[:-1])}.{int(s[-1])}"
    raise ValueError(f"unrecognised compute capability {cc!r} (expected e.g. '8.9' or '89')")


def import_tensorrt(prefer: str | None = None) -> Any:
    """The TensorRT module: ``prefer`` ("tensorrt"/"tensorrt_rtx") first, then the other."""
    import importlib

    order = [prefer] if prefer else []
    order += [m for m in ("tensorrt", "tensorrt_rtx") if m not in order]
    errors = []
    for name in order:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("TensorRT is not installed (pip install 'diffeic-runtime[gpu]'): " + "; ".join(errors))


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as exc:
            raise ImportError("cuda-python is not installed (pip install 'diffeic-runtime[gpu]')") from exc
    return cudart


def gpu_device() -> tuple[str, str]:
    """(name, compute capability) of the current CUDA device, through cuda-python."""
    rt = import_cudart()
    err, dev = rt.cudaGetDevice()
    if int(err) != 0:
        raise RuntimeError(f"no CUDA device (error {int(err)})")
    err, prop = rt.cudaGetDeviceProperties(dev)
    if int(err) != 0:
        raise RuntimeError(f"cannot query CUDA device (error {int(err)})")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"


def engine_io_names(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of the sampler-step engine of ``kind`` (shared with the builder)."""
    ins: tuple[str, ...] = ("x", "eps", "idx", "coefs", "t_table") + (("noise",) if kind == "ddpm" else ()) \
        + (("m_prev",) if kind == "dpmpp" else ())
    return ins, ("x_next", "idx_next", "t_next") + (("m_next",) if kind == "dpmpp" else ())
