"""Diffusion samplers of the DiffEIC runtime, in pure numpy (no torch).

This module owns everything between "x_T and a model that predicts eps" and
"the final latent", plus the official uint8 post-processing of the decoded
image:

* :class:`Schedule`: the DDPM beta schedule of the config (linear,
  0.00085 -> 0.012, 1000 steps) and the float32 ``alphas_cumprod`` buffer
  exactly as ``ldm.models.diffusion.ddpm.DDPM.register_schedule`` stores it.
* :class:`SpacedDDPMSampler`: ``model/spaced_sampler.py`` (``SpacedSampler``
  with ``var_type="fixed_small"``), the default sampler of the official
  ``inference_partition.py``.
* :class:`DDIMSampler`: ``model/ddim_sampler.py`` with eta = 0.
* :class:`DPMSolverPPSampler`: DPM-Solver++ (2M), the official
  ``ldm/models/diffusion/dpm_solver`` code as its ``DPMSolverSampler`` calls it
  (multistep, order 2, time-uniform steps, lower-order final step, data prediction).
* :func:`make_sampler`, :func:`run`, the noise sources :class:`GaussianNoise`
  and :class:`ReplayNoise`, and :func:`to_uint8_image`.

The contract is diffusers-like and tiny: a sampler exposes the timesteps to
pass to the model (in sampling order), ``new_state()`` (per-trajectory memory of a
multistep solver, ``None`` for one-step samplers) and a ``step(i, x, eps, noise,
state)`` that returns the latent for the next step. Model evaluation lives elsewhere
(ONNX Runtime, TensorRT, ...); ``coefficients(i)`` exposes the float32 scalars
of a step so that a GPU backend can bake or upload them (e.g. for graph
capture) and reproduce the same arithmetic.

Arithmetic is float32 element-wise, in the same operation order as the
official torch code. numpy's +, -, *, / and sqrt are correctly rounded, and
so are torch's CPU +, -, *, /; but torch 2.13's CPU float32 ``sqrt`` is NOT
(measured here: about 20 % of uniform inputs come out 1 ulp away from the
correctly rounded value, on the AVX512, AVX2 and default kernels alike). We
use the correctly rounded sqrt rather than emulating an undocumented kernel.
On the golden fixture this gives:

* DDPM (the sqrt is only taken of the variance): latents bit-identical.
* DDIM (``sqrt(1 - a_prev)`` comes out 1 ulp off for 2 of the 4 steps): latents
  within 1.4e-7 of the largest value, a few float32 ulps, far below the
  model's own cross-kernel noise.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Schedule",
    "torch_linspace_f64",
    "Sampler",
    "SpacedDDPMSampler",
    "DDIMSampler",
    "DPMSolverPPSampler",
    "MultistepState",
    "DPMPP_STEPS",
    "SAMPLER_NAMES",
    "make_sampler",
    "space_timesteps",
    "ddim_timesteps",
    "valid_ddim_steps",
    "NoiseSource",
    "GaussianNoise",
    "ReplayNoise",
    "run",
    "to_uint8_image",
]

logger = logging.getLogger(__name__)

SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "dpmpp")

_F32 = np.float32


# --------------------------------------------------------------------------- schedule


@functools.lru_cache(maxsize=8)
def _torch_linspace_f64_cached(start: float, end: float, steps: int) -> tuple[float, ...]:
    if steps == 1:
        return (float(start),)
    step = (end - start) / (steps - 1)
    half = steps // 2
    fs, fe, fstep = Fraction(start), Fraction(end), Fraction(step)

    def fma(k: int, base: Fraction, sign: int) -> float:
        # Exact a*b+c, rounded once to float64 (float(Fraction) rounds to nearest).
        return float(sign * fstep * k + base)

    return tuple(
        fma(k, fs, 1) if k < half else fma(steps - 1 - k, fe, -1) for k in range(steps)
    )


def torch_linspace_f64(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float64)`` without torch.

    torch's CPU kernel fills the first half as ``start + step * k`` and the
    second half as ``end - step * (steps - 1 - k)`` with
    ``step = (end - start) / (steps - 1)``, and its vectorised kernels fuse the
    multiply-add (one rounding). Emulating the fused multiply-add exactly (with
    rationals) reproduces torch 2.x's values bit-for-bit (checked for the
    DiffEIC schedule against torch 2.13 CPU; differs from ``np.linspace``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return np.array(_torch_linspace_f64_cached(float(start), float(end), int(steps)), dtype=np.float64)


@dataclass(frozen=True)
class Schedule:
    """The DDPM training schedule (``register_schedule`` with the "linear" beta schedule).

    Defaults are the DiffEIC config values (``linear_start`` 0.00085,
    ``linear_end`` 0.012, ``timesteps`` 1000).
    """

    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if not (0.0 < self.linear_start <= self.linear_end < 1.0):
            raise ValueError(
                f"need 0 < linear_start <= linear_end < 1, got {self.linear_start}, {self.linear_end}"
            )

    def betas(self) -> np.ndarray:
        """float64 betas: ``torch.linspace(sqrt(start), sqrt(end), n, dtype=float64) ** 2``.

        The linspace is :func:`torch_linspace_f64`, which reproduces torch's
        float64 values bit-for-bit; ``np.linspace`` differs by an ulp in ~15 %
        of the entries, which would leak into the float64 respaced DDPM schedule.
        """
        return torch_linspace_f64(self.linear_start**0.5, self.linear_end**0.5, self.num_timesteps) ** 2

    def alphas_cumprod(self) -> np.ndarray:
        """float64 ``cumprod(1 - betas)``, as register_schedule / SpacedSampler compute it."""
        return np.cumprod(1.0 - self.betas(), axis=0)

    def alphas_cumprod_f32(self) -> np.ndarray:
        """The model's float32 ``alphas_cumprod`` buffer.

        register_schedule computes in float64 numpy and then
        ``torch.tensor(..., dtype=float32)``, i.e. one round-to-nearest cast,
        which is exactly numpy's ``astype(float32)``.
        """
        return self.alphas_cumprod().astype(np.float32)


# --------------------------------------------------------------------------- timestep rules


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """guided-diffusion ``respace.space_timesteps``, as vendored by ``model/spaced_sampler.py``.

    ``section_counts`` is a comma-separated list of per-section step counts or
    ``"ddimN"``. Python's ``round`` (half to even) is used, as in the original.
    """
    if section_counts.startswith("ddim"):
        desired_count = int(section_counts[len("ddim") :])
        for i in range(1, num_timesteps):
            if len(range(0, num_timesteps, i)) == desired_count:
                return set(range(0, num_timesteps, i))
        raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
    counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def _ddim_raw_timesteps(steps: int, num_timesteps: int) -> np.ndarray:
    # make_ddim_timesteps("uniform"): range(0, T, T // S) + 1, ascending.
    stride = num_timesteps // steps
    return np.arange(0, num_timesteps, stride, dtype=np.int64) + 1


def valid_ddim_steps(num_timesteps: int = 1000) -> list[int]:
    """All S for which the official DDIM rule stays inside the schedule.

    The official rule fails (IndexError on ``alphas_cumprod[T]``) exactly when
    ``T // S`` divides ``T - 1`` (the range then contains T - 1, and +1 gives T),
    and for S > T (stride 0).
    """
    return [
        s
        for s in range(1, num_timesteps + 1)
        if int(_ddim_raw_timesteps(s, num_timesteps)[-1]) < num_timesteps
    ]


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """Official DDIM timesteps for ``S = steps``, ascending (index 0 = last sampling step).

    Follows ``make_ddim_timesteps("uniform")`` exactly, so the number of steps
    actually taken is ``len(range(0, T, T // S))``, which can exceed S (S=6 ->
    7 steps, S=7 -> 8 steps); this is kept because matching the official
    output for a given S requires it.

    Design decision: where the official code crashes (the last timestep would
    be T, e.g. S=3 gives 1, 334, 667, 1000 and ``alphas_cumprod[1000]`` raises
    IndexError), we raise a ValueError naming the nearest valid S instead of
    silently clamping or choosing another rule, because any substitute would
    produce output the official code never produces for that S.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"DDIM steps must be an int, got {steps!r}")
    steps = int(steps)
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"DDIM steps must be in 1..{num_timesteps}, got {steps}")
    ts = _ddim_raw_timesteps(steps, num_timesteps)
    if int(ts[-1]) >= num_timesteps:
        valid = valid_ddim_steps(num_timesteps)
        below = [s for s in valid if s < steps][-3:]
        above = [s for s in valid if s > steps][:3]
        raise ValueError(
            f"DDIM steps={steps} is not supported: the official rule range(0, {num_timesteps}, "
            f"{num_timesteps // steps}) + 1 reaches timestep {int(ts[-1])}, outside the "
            f"{num_timesteps}-step schedule (the official sampler fails with IndexError). "
            f"Valid nearby choices: {below + above} (a step count S is invalid exactly when "
            f"{num_timesteps} // S divides {num_timesteps - 1})."
        )
    return ts


# --------------------------------------------------------------------------- samplers


@runtime_checkable
class Sampler(Protocol):
    """What the runtime needs from a sampler."""

    name: str
    # The t passed to the model, in sampling order: int64 for DDPM/DDIM (the official
    # integer timesteps), float32 for DPM-Solver++ (continuous time mapped to 0..999).
    timesteps: np.ndarray

    def needs_noise(self) -> bool:
        """True if ``step`` consumes one noise array per step."""
        ...

    def new_state(self) -> "MultistepState | None":
        """Fresh per-trajectory memory for ``step`` (``None``: the sampler keeps none)."""
        ...

    def step(self, i: int, x: np.ndarray, eps: np.ndarray, noise: np.ndarray | None,
             state: "MultistepState | None" = None) -> np.ndarray:
        """Step i (0..n-1, sampling order): latent x and model output eps -> next latent (float32)."""
        ...

    def coefficients(self, i: int) -> dict[str, np.float32]:
        """The float32 scalars used by step i."""
        ...


def _check_index(i: int, n: int) -> int:
    i = int(i)
    if not 0 <= i < n:
        raise IndexError(f"step index {i} out of range for a {n}-step sampler")
    return i


def _as_f32(a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != np.float32:
        # float64 inputs would silently change the arithmetic; a cast is the
        # only sensible interpretation and matches torch's float32 tensors.
        arr = arr.astype(np.float32)
    return arr


class SpacedDDPMSampler:
    """``model/spaced_sampler.py`` ``SpacedSampler(var_type="fixed_small")``.

    The respaced schedule is computed in float64 (like the official numpy
    code); each coefficient is cast to float32 when used
    (``_extract_into_tensor(...).float()``). Coefficients are indexed by the
    step index ``index = n - 1 - i`` while the model gets the ORIGINAL
    timestep. Per step::

        pred_x0 = c_recip[idx] * x - c_recipm1[idx] * eps
        mean    = coef1[idx] * pred_x0 + coef2[idx] * x
        x_prev  = mean + (mask * sqrt(var[idx])) * noise     # mask = 0 at idx 0

    The noise of the last step is drawn by the official code but multiplied by
    0, so it has no effect unless it is non-finite.
    """

    name: str = "ddpm"

    def __init__(self, steps: int, schedule: Schedule | None = None) -> None:
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"DDPM steps must be a positive int, got {steps!r}")
        self.schedule = schedule if schedule is not None else Schedule()
        T = self.schedule.num_timesteps
        if steps > T:
            raise ValueError(f"DDPM steps must be in 1..{T}, got {steps}")
        self.num_steps = int(steps)

        original_alphas_cumprod = self.schedule.alphas_cumprod()
        used = space_timesteps(T, str(self.num_steps))
        betas: list[float] = []
        last_alpha_cumprod = 1.0
        for t, alpha_cumprod in enumerate(original_alphas_cumprod):
            if t in used:
                # Same marginal q(x_{S_t} | x_0) as the original chain.
                betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
        if len(betas) != self.num_steps:
            raise ValueError(f"space_timesteps gave {len(betas)} steps, expected {self.num_steps}")

        # float64 respaced schedule, indexed by step index (0 = last sampling step).
        self.betas = np.array(betas, dtype=np.float64)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = (
            self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef1 = (
            self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # Ascending original timesteps; sampling walks them in reverse.
        self.schedule_timesteps = np.array(sorted(used), dtype=np.int64)
        self.timesteps: np.ndarray = self.schedule_timesteps[::-1].copy()

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"SpacedDDPMSampler(steps={self.num_steps}, timesteps={self.timesteps.tolist()})"

    def needs_noise(self) -> bool:
        return True

    def new_state(self) -> None:
        return None

    def index(self, i: int) -> int:
        """Coefficient index of sampling step i (official ``index = total_steps - i - 1``)."""
        return self.num_steps - 1 - _check_index(i, self.num_steps)

    def coefficients(self, i: int) -> dict[str, np.float32]:
        idx = self.index(i)
        var = _F32(self.posterior_variance[idx])
        return {
            "sqrt_recip_alphas_cumprod": _F32(self.sqrt_recip_alphas_cumprod[idx]),
            "sqrt_recipm1_alphas_cumprod": _F32(self.sqrt_recipm1_alphas_cumprod[idx]),
            "posterior_mean_coef1": _F32(self.posterior_mean_coef1[idx]),
            "posterior_mean_coef2": _F32(self.posterior_mean_coef2[idx]),
            "posterior_variance": var,
            # torch: sqrt of the float32 variance, in float32.
            "sqrt_variance": np.sqrt(var),
            "noise_mask": _F32(0.0 if idx == 0 else 1.0),
        }

    def predict_x0(self, i: int, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """``_predict_xstart_from_eps`` for sampling step i (float32)."""
        c = self.coefficients(i)
        x = _as_f32(x)
        eps = _as_f32(eps)
        return c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps

    def step(self, i: int, x: np.ndarray, eps: np.ndarray, noise: np.ndarray | None,
             state: None = None) -> np.ndarray:
        c = self.coefficients(i)
        x = _as_f32(x)
        eps = _as_f32(eps)
        if eps.shape != x.shape:
            raise ValueError(f"eps shape {eps.shape} != x shape {x.shape}")
        pred_x0 = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
        mean = c["posterior_mean_coef1"] * pred_x0 + c["posterior_mean_coef2"] * x
        if noise is None:
            if c["noise_mask"] != 0:
                raise ValueError(f"DDPM step {i} needs a noise array (only the last step may omit it)")
            # Official: mean + 0 * sqrt(var) * noise == mean for finite noise.
            return mean.astype(np.float32, copy=False)
        noise = _as_f32(noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {noise.shape} != x shape {x.shape}")
        # Same association as torch: (mask * sqrt(var)) * noise, then add.
        scale = c["noise_mask"] * c["sqrt_variance"]
        return (mean + scale * noise).astype(np.float32, copy=False)


class DDIMSampler:
    """``model/ddim_sampler.py`` with eta = 0 (deterministic).

    Alphas are taken from the model's float32 ``alphas_cumprod`` buffer at the
    official timesteps (:func:`ddim_timesteps`); ``alphas_prev[0] =
    alphas_cumprod[0]`` (0.99915, not 1). Per step, all float32::

        pred_x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)
        x_prev  = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - 0) * eps

    The official code also draws one ``randn`` per step and multiplies it by
    sigma = 0; that has no effect, so this sampler takes no noise.
    """

    name: str = "ddim"

    def __init__(self, steps: int, schedule: Schedule | None = None) -> None:
        self.schedule = schedule if schedule is not None else Schedule()
        T = self.schedule.num_timesteps
        self.schedule_timesteps = ddim_timesteps(steps, T)  # ascending; validates steps
        self.requested_steps = int(steps)
        self.num_steps = int(self.schedule_timesteps.shape[0])
        if self.num_steps != steps:
            logger.info(
                "DDIM S=%d runs %d steps (official rule range(0, %d, %d) + 1)",
                steps, self.num_steps, T, T // steps,
            )
        acp = self.schedule.alphas_cumprod_f32()
        # make_ddim_sampling_parameters, float32 values (indexed by step index).
        self.ddim_alphas = acp[self.schedule_timesteps].astype(np.float32)
        self.ddim_alphas_prev = np.concatenate(
            [acp[:1], acp[self.schedule_timesteps[:-1]]]
        ).astype(np.float32)
        # np.sqrt(1. - ddim_alphas) on a float32 tensor: float32 subtraction and sqrt.
        self.ddim_sqrt_one_minus_alphas = np.sqrt(_F32(1.0) - self.ddim_alphas)
        self.timesteps: np.ndarray = self.schedule_timesteps[::-1].copy()

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (
            f"DDIMSampler(S={self.requested_steps}, steps={self.num_steps}, "
            f"timesteps={self.timesteps.tolist()})"
        )

    def needs_noise(self) -> bool:
        return False

    def new_state(self) -> None:
        return None

    def index(self, i: int) -> int:
        """Coefficient index of sampling step i (official ``index = total_steps - i - 1``)."""
        return self.num_steps - 1 - _check_index(i, self.num_steps)

    def coefficients(self, i: int) -> dict[str, np.float32]:
        idx = self.index(i)
        a_t = self.ddim_alphas[idx]
        a_prev = self.ddim_alphas_prev[idx]
        return {
            "a_t": a_t,
            "a_prev": a_prev,
            "sqrt_one_minus_a_t": self.ddim_sqrt_one_minus_alphas[idx],
            "sqrt_a_t": np.sqrt(a_t),
            "sqrt_a_prev": np.sqrt(a_prev),
            # (1 - a_prev - sigma**2).sqrt() with sigma = 0, float32.
            "dir_coef": np.sqrt((_F32(1.0) - a_prev) - _F32(0.0)),
        }

    def step_with_x0(self, i: int, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One DDIM step returning ``(x_prev, pred_x0)``, both float32."""
        c = self.coefficients(i)
        x = _as_f32(x)
        eps = _as_f32(eps)
        if eps.shape != x.shape:
            raise ValueError(f"eps shape {eps.shape} != x shape {x.shape}")
        # A true division (not a multiply by the reciprocal), as torch does.
        pred_x0 = (x - c["sqrt_one_minus_a_t"] * eps) / c["sqrt_a_t"]
        x_prev = c["sqrt_a_prev"] * pred_x0 + c["dir_coef"] * eps
        return x_prev.astype(np.float32, copy=False), pred_x0.astype(np.float32, copy=False)

    def predict_x0(self, i: int, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        return self.step_with_x0(i, x, eps)[1]

    def step(self, i: int, x: np.ndarray, eps: np.ndarray, noise: np.ndarray | None = None,
             state: None = None) -> np.ndarray:
        # noise is accepted and ignored: with eta = 0 the official code multiplies it by 0.
        return self.step_with_x0(i, x, eps)[0]


# --------------------------------------------------------------------------- DPM-Solver++ (2M)

# Step counts the runtime accepts for DPM-Solver++: the range it is meant for (fewer
# steps than the 50 of DDPM). The official code itself only needs steps >= order (2).
DPMPP_STEPS: tuple[int, int] = (10, 25)
# ``lower_order_final`` in the official ``DPM_Solver.sample`` applies below this many steps.
_DPMPP_LOWER_ORDER_FINAL_BELOW = 15


def _round_f32(q: Fraction) -> np.float32:
    """The float32 nearest to the exact rational ``q`` (ties to even), one rounding."""
    f = np.float32(float(q))  # may be off by one float32 ulp (double rounding); fix below
    best = f
    for c in (np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))):
        dc, db = abs(Fraction(float(c)) - q), abs(Fraction(float(best)) - q)
        if dc < db or (dc == db and (int(c.view(np.uint32)) & 1) == 0):
            best = c
    return np.float32(best)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32) without torch.

    As for float64 (:func:`torch_linspace_f64`): ``step = (end - start) / (steps - 1)`` in
    float32, the first half ``start + step * k`` and the second half ``end - step *
    (steps - 1 - k)``, each a fused multiply-add (one rounding). Checked bit for bit
    against torch 2.13 CPU in the tests.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s, e = _F32(start), _F32(end)
    if steps == 1:
        return np.array([s], np.float32)
    step = _F32((e - s) / _F32(steps - 1))
    fs, fe, fstep = Fraction(float(s)), Fraction(float(e)), Fraction(float(step))
    half = steps // 2
    return np.array([_round_f32(fs + fstep * k) if k < half else _round_f32(fe - fstep * (steps - 1 - k))
                     for k in range(steps)], dtype=np.float32)


def _f32(fn: Callable[[float], float], v: np.float32) -> np.float32:
    """A transcendental function of a float32 scalar, evaluated in float64 and rounded once.

    torch's float32 kernels (SLEEF, <= 1 ulp) may differ from this by an ulp; that is the
    only source of difference from the official arithmetic (see the module docstring)."""
    return _F32(fn(float(v)))


class _DiscreteVPSchedule:
    """``NoiseScheduleVP('discrete', alphas_cumprod=...)`` of the official dpm_solver.py, float32.

    ``log_alpha(t)`` is the piecewise-linear interpolation of ``0.5 * log(alphas_cumprod)``
    over ``t_n = (n + 1) / N``, with the official op order (``interpolate_fn``)."""

    def __init__(self, alphas_cumprod_f32: np.ndarray) -> None:
        acp = np.asarray(alphas_cumprod_f32, dtype=np.float32)
        self.total_N = int(acp.shape[0])
        self.t_array = torch_linspace_f32(0.0, 1.0, self.total_N + 1)[1:]
        self.log_alpha_array = np.array([_F32(0.5) * _f32(np.log, a) for a in acp], dtype=np.float32)

    def log_alpha(self, t: np.float32) -> np.float32:
        xp, yp, K = self.t_array, self.log_alpha_array, self.total_N
        # interpolate_fn: the segment around t; outside the keypoints the outermost segment.
        k = int(np.searchsorted(xp, t, side="left"))
        start = 0 if k == 0 else (K - 2 if k >= K else k - 1)
        sx, ex, sy, ey = xp[start], xp[start + 1], yp[start], yp[start + 1]
        return _F32(sy + _F32(_F32(_F32(t - sx) * _F32(ey - sy)) / _F32(ex - sx)))

    def alpha(self, t: np.float32) -> np.float32:
        return _f32(np.exp, self.log_alpha(t))

    def sigma(self, t: np.float32) -> np.float32:
        return _f32(np.sqrt, _F32(_F32(1.0) - _f32(np.exp, _F32(_F32(2.0) * self.log_alpha(t)))))

    def lamb(self, t: np.float32) -> np.float32:
        la = self.log_alpha(t)
        log_std = _F32(_F32(0.5) * _f32(np.log, _F32(_F32(1.0) - _f32(np.exp, _F32(_F32(2.0) * la)))))
        return _F32(la - log_std)


@dataclass
class MultistepState:
    """What a multistep solver remembers between steps of one trajectory."""

    prev_x0: np.ndarray | None = None  # data prediction of the previous step
    next_step: int = 0


class DPMSolverPPSampler:
    """DPM-Solver++ (2M): the official ``DPMSolverSampler`` of ``ldm/models/diffusion/dpm_solver``.

    The official sampler calls ``DPM_Solver(model_fn, NoiseScheduleVP('discrete',
    alphas_cumprod), predict_x0=True).sample(x_T, steps=S, skip_type='time_uniform',
    method='multistep', order=2, lower_order_final=True)``. With ``t_j`` =
    ``linspace(1, 1/N, S + 1)`` (float32), step i (0..S-1) evaluates the model once at
    ``(x_i, t_i)`` (model time ``(t_i - 1/N) * 1000``, a float), forms the data prediction
    ``m_i = (x_i - sigma_i * eps) / alpha_i`` and moves to ``t_{i+1}``::

        order 1 (i = 0, and the last step when S < 15):
            x_{i+1} = (sigma_{i+1} / sigma_i) * x_i - (alpha_{i+1} * expm1(-h)) * m_i
        order 2:
            D = (1 / r) * (m_i - m_{i-1}),   r = (lambda_i - lambda_{i-1}) / h
            x_{i+1} = (sigma_{i+1} / sigma_i) * x_i - a * m_i - (0.5 * a) * D,
            a = alpha_{i+1} * (exp(-h) - 1)

    with ``h = lambda_{i+1} - lambda_i`` and ``lambda = log alpha - log sigma``. Both
    orders are the one formula ``x_{i+1} = (c_x * x - a * m) - half_a * (inv_r * (m -
    m_prev))`` with ``half_a = inv_r = 0`` for order 1 (exact: the subtracted term is
    +-0), which is what the coefficients and the sampler-step engine use. All arithmetic
    is float32 in the official op order; the schedule's exp/log/sqrt are correctly
    rounded here (torch's may be 1 ulp off). Deterministic: no noise.
    """

    name: str = "dpmpp"
    order: int = 2

    def __init__(self, steps: int, schedule: Schedule | None = None) -> None:
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
            raise ValueError(f"DPM-Solver++ steps must be an int, got {steps!r}")
        lo, hi = DPMPP_STEPS
        if not lo <= int(steps) <= hi:
            raise ValueError(f"DPM-Solver++ steps must be in {lo}..{hi}, got {steps} "
                             "(use --sampler ddpm or ddim for other step counts)")
        self.schedule = schedule if schedule is not None else Schedule()
        self.num_steps = S = int(steps)
        ns = _DiscreteVPSchedule(self.schedule.alphas_cumprod_f32())
        self.noise_schedule = ns
        t_0 = 1.0 / ns.total_N
        self.t_continuous = torch_linspace_f32(1.0, t_0, S + 1)  # t_T = 1 ... t_0 = 1/N
        # model_wrapper's get_model_input_time: (t - 1/N) * 1000, float32
        self.timesteps: np.ndarray = np.array(
            [_F32(_F32(t - _F32(t_0)) * _F32(1000.0)) for t in self.t_continuous[:S]], dtype=np.float32)
        lam = [ns.lamb(t) for t in self.t_continuous]
        alpha = [ns.alpha(t) for t in self.t_continuous]
        sigma = [ns.sigma(t) for t in self.t_continuous]
        self.orders = [1 if (i == 0 or (i == S - 1 and S < _DPMPP_LOWER_ORDER_FINAL_BELOW)) else 2
                       for i in range(S)]
        self._coefs: list[dict[str, np.float32]] = []
        for i in range(S):
            h = _F32(lam[i + 1] - lam[i])
            c = {"sigma": sigma[i], "alpha": alpha[i], "c_x": _F32(sigma[i + 1] / sigma[i])}
            if self.orders[i] == 1:
                c["a"] = _F32(alpha[i + 1] * _f32(np.expm1, _F32(-h)))
                c["half_a"] = _F32(0.0)
                c["inv_r"] = _F32(0.0)
            else:
                h_0 = _F32(lam[i] - lam[i - 1])
                r0 = _F32(h_0 / h)
                a = _F32(alpha[i + 1] * _F32(_f32(np.exp, _F32(-h)) - _F32(1.0)))
                c["a"], c["half_a"], c["inv_r"] = a, _F32(_F32(0.5) * a), _F32(_F32(1.0) / r0)
            self._coefs.append(c)

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"DPMSolverPPSampler(steps={self.num_steps}, orders={self.orders})"

    def needs_noise(self) -> bool:
        return False

    def new_state(self) -> MultistepState:
        return MultistepState()

    def coefficients(self, i: int) -> dict[str, np.float32]:
        """float32 scalars of step i: ``sigma``, ``alpha`` (data prediction at t_i), ``c_x``,
        ``a``, ``half_a``, ``inv_r`` (the update to t_{i+1})."""
        return dict(self._coefs[_check_index(i, self.num_steps)])

    def predict_x0(self, i: int, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """``data_prediction_fn``: ``(x - sigma_t * eps) / alpha_t`` (a true division)."""
        c = self._coefs[_check_index(i, self.num_steps)]
        return (_as_f32(x) - c["sigma"] * _as_f32(eps)) / c["alpha"]

    def step(self, i: int, x: np.ndarray, eps: np.ndarray, noise: np.ndarray | None = None,
             state: MultistepState | None = None) -> np.ndarray:
        if state is None:
            raise ValueError("DPM-Solver++ is a multistep solver: pass the state from sampler.new_state()")
        i = _check_index(i, self.num_steps)
        if i != state.next_step:
            raise RuntimeError(f"DPM-Solver++ steps must run in order: expected step {state.next_step}, got {i}")
        x = _as_f32(x)
        eps = _as_f32(eps)
        if eps.shape != x.shape:
            raise ValueError(f"eps shape {eps.shape} != x shape {x.shape}")
        c = self._coefs[i]
        m = self.predict_x0(i, x, eps)
        if self.orders[i] == 1:  # dpm_solver_first_update
            x_next = c["c_x"] * x - c["a"] * m
        else:  # multistep_dpm_solver_second_update, solver_type 'dpm_solver'
            assert state.prev_x0 is not None
            d1 = c["inv_r"] * (m - state.prev_x0)
            x_next = c["c_x"] * x - c["a"] * m - c["half_a"] * d1
        state.prev_x0, state.next_step = m, i + 1
        return x_next.astype(np.float32, copy=False)


def make_sampler(name: str, steps: int, schedule: Schedule | None = None) -> Sampler:
    """Build the official sampler ``name`` ("ddpm", "ddim" or "dpmpp") for ``steps`` steps."""
    key = name.lower() if isinstance(name, str) else name
    if key == "ddpm":
        return SpacedDDPMSampler(steps, schedule)
    if key == "ddim":
        return DDIMSampler(steps, schedule)
    if key == "dpmpp":
        return DPMSolverPPSampler(steps, schedule)
    raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLER_NAMES)}")


# --------------------------------------------------------------------------- noise


class NoiseSource(Protocol):
    """Supplies x_T and then one noise array per sampling step."""

    def initial(self, shape: tuple[int, ...]) -> np.ndarray:
        """x_T of the given shape (float32)."""
        ...

    def step_noise(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        """The noise of sampling step i (float32)."""
        ...

    def check(self, sampler: Sampler, shape: tuple[int, ...]) -> None:
        """Raise ValueError if this source cannot serve ``sampler`` at latent ``shape``."""
        ...


class GaussianNoise:
    """Fresh N(0, 1) float32 noise from ``np.random.default_rng(seed)``.

    Draw order follows the official protocol: x_T first, then one array per
    step in sampling order. It can NOT replay torch's generator (the official
    ``seed_everything`` + ``torch.randn`` stream); to reproduce an official
    run, inject the recorded arrays with :class:`ReplayNoise` instead.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._next = -1  # -1: x_T not drawn yet; k >= 0: next step noise index

    def initial(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._next != -1:
            raise RuntimeError("x_T was already drawn from this GaussianNoise; create a new one")
        self._next = 0
        return self._rng.standard_normal(tuple(shape), dtype=np.float32)

    def step_noise(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        # Enforce the draw order so that a given seed always maps to the same arrays.
        if self._next == -1:
            self._next = 0  # x_T injected from elsewhere; step noise starts the stream
        if i != self._next:
            raise RuntimeError(f"noise must be drawn in step order: expected step {self._next}, got {i}")
        self._next += 1
        return self._rng.standard_normal(tuple(shape), dtype=np.float32)

    def check(self, sampler: Sampler, shape: tuple[int, ...]) -> None:
        return None


class ReplayNoise:
    """Replays a recorded x_T and (optionally) the per-step noise, e.g. from a fixture ``.npz``.

    ``noise`` has shape ``(n, *x_T.shape)`` for an n-step sampler that needs
    noise (the official DDPM draws one per step, the last one unused).
    """

    def __init__(self, x_T: np.ndarray, noise_steps: np.ndarray | None = None) -> None:
        self.x_T = np.asarray(x_T, dtype=np.float32)
        self.noise = None if noise_steps is None else np.asarray(noise_steps, dtype=np.float32)

    @classmethod
    def from_npz(cls, path: str | Path) -> "ReplayNoise":
        """Load keys ``x_T`` and optional ``noise`` from an .npz file."""
        with np.load(path) as data:
            if "x_T" not in data:
                raise ValueError(f"{path}: no 'x_T' array")
            noise = data["noise"] if "noise" in data else None
            return cls(data["x_T"], noise)

    def check(self, sampler: Sampler, shape: tuple[int, ...] | None = None) -> None:
        shape = tuple(self.x_T.shape) if shape is None else tuple(shape)
        if tuple(self.x_T.shape) != shape:
            raise ValueError(f"recorded x_T has shape {self.x_T.shape}, latent shape is {shape}")
        if not sampler.needs_noise():
            # Deterministic samplers never read the noise, so its count is irrelevant.
            return
        n = len(sampler.timesteps)
        if self.noise is None:
            raise ValueError(f"sampler {sampler.name!r} needs {n} noise arrays but none were recorded")
        expected = (n, *shape)
        if tuple(self.noise.shape) != expected:
            raise ValueError(
                f"recorded noise has shape {tuple(self.noise.shape)}, sampler {sampler.name!r} "
                f"with {n} steps needs {expected}"
            )

    def initial(self, shape: tuple[int, ...]) -> np.ndarray:
        if tuple(shape) != tuple(self.x_T.shape):
            raise ValueError(f"recorded x_T has shape {self.x_T.shape}, requested {tuple(shape)}")
        return self.x_T.copy()

    def step_noise(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        if self.noise is None:
            raise ValueError("no recorded noise to replay")
        if not 0 <= i < self.noise.shape[0]:
            raise ValueError(f"step {i} out of range: {self.noise.shape[0]} noise arrays recorded")
        out = self.noise[i]
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"recorded noise[{i}] has shape {out.shape}, requested {tuple(shape)}")
        return out.copy()


# --------------------------------------------------------------------------- loop


ModelFn = Callable[[np.ndarray, "int | float"], np.ndarray]
StepCallback = Callable[[int, "int | float", np.ndarray, np.ndarray], None]


def run(
    sampler: Sampler,
    x_T: np.ndarray,
    model_fn: ModelFn,
    noise_source: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """Run the whole sampling loop and return the final latent (float32).

    ``model_fn(x, t)`` returns eps for latent x at model time t (an int for DDPM/DDIM,
    the original timestep; a float for DPM-Solver++).
    ``noise_source`` is required when ``sampler.needs_noise()``; its
    ``step_noise(i, shape)`` is called once per step after the model call, the
    official draw order. ``callback(i, t, x_next, eps)`` is called after each step.
    """
    x = np.asarray(x_T, dtype=np.float32)
    state = sampler.new_state()
    needs = sampler.needs_noise()
    if needs:
        if noise_source is None:
            raise ValueError(f"sampler {sampler.name!r} needs a noise source")
        noise_source.check(sampler, tuple(x.shape))
    for i, t in enumerate(sampler.timesteps.tolist()):
        eps = np.asarray(model_fn(x, t))
        if eps.shape != x.shape:
            raise ValueError(f"model_fn returned shape {eps.shape} at t={t}, expected {x.shape}")
        noise = noise_source.step_noise(i, tuple(x.shape)) if needs and noise_source else None
        x = sampler.step(i, x, eps, noise, state)
        if callback is not None:
            callback(i, t, x, eps)
    return x


# --------------------------------------------------------------------------- post-processing


def to_uint8_image(decoded: np.ndarray) -> np.ndarray:
    """Official post-processing: (1, 3, H, W) decoded image in ~[-1, 1] -> (H, W, 3) uint8.

    ``((x + 1) / 2).clamp(0, 1) * 255`` in float32, then ``.astype(uint8)``,
    which TRUNCATES (does not round). Cropping to the input size is the
    caller's job.
    """
    x = np.asarray(decoded)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"expected decoded of shape (1, 3, H, W), got {x.shape}")
    x = x.astype(np.float32, copy=False)
    # Each op rounds to float32 exactly like the torch tensor ops.
    y = np.clip((x + _F32(1.0)) / _F32(2.0), _F32(0.0), _F32(1.0))
    y = y[0].transpose(1, 2, 0) * _F32(255.0)
    return np.clip(y, 0, 255).astype(np.uint8)
