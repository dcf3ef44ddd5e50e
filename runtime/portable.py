"""Portable entropy path: the integer hyper decoder and context model (issue #7).

In the reference entropy path the rANS scales and means of later slices come from float
networks run on already decoded values. If a decoder computes one scale on the other
side of a scale-table threshold, or one mean a little differently, the rANS decoder
desynchronises. In the portable path every value that influences parsing (hyper decoder
output, channel and local context, entropy parameters, CDF index, mean, the symbol and
the dequantised y fed back into the context) is an integer computed with the exact
semantics of ``docs/portable-entropy.md``, so any correct implementation on any hardware
produces the same integers and therefore parses the same stream. The content decoder,
``f_c``, the UNet and the VAE stay floating point: they never influence parsing.

This module is pure numpy (no torch). It holds:

* :class:`PortableParams`: the ``portable.npz`` artifact (int16 weights, int64 biases,
  requantisation shifts, GELU lookup tables, input exponents, integer scale thresholds),
  validated on load so that every bound the exactness argument needs is checked;
* :class:`PortableContextModel`: the integer networks and the slice loop, with
  :meth:`~PortableContextModel.encode` / :meth:`~PortableContextModel.decode`;
* :func:`portable_encode_y` / :func:`portable_decode_y`: one-call wrappers.

Speed comes from one observation: every product of an int16 weight and an int16
activation is below 2^30 in magnitude, and the artifact guarantees
``32767 * sum|W| < 2^53`` per output channel, so every partial sum of a convolution is an
integer below 2^53 and a float64 GEMM (any BLAS, any blocking, any thread count, with or
without FMA, cuBLAS DGEMM too) returns the exact integer result whatever the summation
order. ``gemm="int64"`` runs the same network with numpy's integer matmul instead, as a
cross-check of that claim.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import entropy_coding
from .entropy_coding import GaussianTables, encode_with_indexes

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION", "PORTABLE_FILE", "PortableParams", "IntLayer", "PortableContextModel",
    "PortableResult", "portable_encode_y", "portable_decode_y", "sha256_file",
]

FORMAT_VERSION = 1
PORTABLE_FILE = "portable.npz"

INT16_MIN, INT16_MAX = -32768, 32767
#: Weights are symmetric int16 (the value -32768 is never used).
W_MAX = 32767
#: Exactness bound of the float64 GEMM: every partial sum must stay below 2^53.
GEMM_BOUND = 1 << 53
#: Number of scale-table thresholds compared (compressai: entries 0..62 of the 64-entry table).
N_THRESHOLDS = 63
#: |mean| is clamped to 2^16 (in y units); |symbol| to 2^30 (int32-safe for the coder).
MEAN_LIMIT_LOG2 = 16
SYMBOL_LIMIT = 1 << 30
#: y on the encoder side is clamped to |y| <= 2^24 before the fixed-point conversion.
Y_LIMIT_LOG2 = 24

ACT_NONE = -1


# =========================================================================== integer primitives

def round_shift(v: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """RS(v, s): floor((v + 2^(s-1)) / 2^s) for s > 0, v for s = 0, v * 2^-s for s < 0.

    ``v`` is int64; ``shift`` broadcasts against it (per output channel: shape (O, 1, ...)).
    Rounds half up (towards +inf). numpy's ``>>`` on signed integers is an arithmetic
    shift, i.e. a floor division by 2^s, which is what the spec defines.
    """
    v = np.asarray(v, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    if (s >= 0).all():
        half = np.left_shift(np.int64(1), s) >> 1
        return np.right_shift(v + half, s)
    pos = np.maximum(s, 0)
    neg = np.maximum(-s, 0)
    half = np.left_shift(np.int64(1), pos) >> 1
    return np.where(s >= 0, np.right_shift(v + half, pos), np.left_shift(v, neg))


def sat16(v: np.ndarray) -> np.ndarray:
    """Saturate to int16 [-32768, 32767]."""
    return np.clip(v, INT16_MIN, INT16_MAX).astype(np.int16)


def _gemm(w: np.ndarray, x: np.ndarray, mode: str) -> np.ndarray:
    """Exact integer product ``w @ x`` (int64 result) of int-valued matrices.

    ``float64``: BLAS DGEMM; exact because the artifact bounds every partial sum below
    2^53 (checked by :meth:`PortableParams.validate`). ``int64``: numpy integer matmul
    (no BLAS, a different summation order), used to cross-check.
    """
    if mode == "float64":
        return np.matmul(w, x.astype(np.float64, copy=False)).astype(np.int64)
    return np.matmul(w.astype(np.int64, copy=False), x.astype(np.int64, copy=False))


# =========================================================================== artifact

@dataclass
class IntLayer:
    """One integer convolution (``kind`` "conv", stride 1) or transposed convolution.

    weight: int16, torch layout ((O, C, k, k) for conv, (C, O, k, k) for deconv).
    bias: int64 (O,), in accumulator units. shift: int32 (O,), the requantisation shift.
    act: index of the GELU LUT applied after requantisation, or -1.
    """

    name: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray
    shift: np.ndarray
    act: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    _wmat: np.ndarray | None = field(default=None, repr=False)

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[1] if self.kind == "deconv" else self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[0] if self.kind == "deconv" else self.weight.shape[1])

    @property
    def k(self) -> int:
        return int(self.weight.shape[-1])

    def wmat(self) -> np.ndarray:
        """float64 weight matrix for the GEMM (conv: (O, C*k*k); deconv: (O*k*k, C))."""
        if self._wmat is None:
            w = self.weight.astype(np.float64)
            if self.kind == "conv":
                self._wmat = np.ascontiguousarray(w.reshape(w.shape[0], -1))
            else:
                self._wmat = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(-1, w.shape[0]))
        return self._wmat

    def abs_sum(self) -> np.ndarray:
        """Per output channel sum of |W| (int64)."""
        w = np.abs(self.weight.astype(np.int64))
        return w.sum(axis=(0, 2, 3)) if self.kind == "deconv" else w.sum(axis=(1, 2, 3))


def _layer_names(slice_num: int) -> list[str]:
    names = [f"hyper.{j}" for j in range(3)]
    for i in range(slice_num):
        if i:
            names += [f"cc{i}.{j}" for j in range(3)]
        names.append(f"lc{i}")
        names += [f"epa{i}.{j}" for j in range(3)]
        names += [f"epn{i}.{j}" for j in range(3)]
    return names


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class PortableParams:
    """Everything the integer path needs, as stored in ``portable.npz``.

    Fields: ``N``, ``M``, ``slice_ch``; ``mean_frac_bits`` (F: means and y_hat live on
    the grid 2^-F); ``z_exp`` (N,) and ``y_exp`` (M,) input exponents; ``layers`` by
    name (see :func:`_layer_names`); ``gelu_luts`` int16 (L, 65536); ``thresholds``
    (``"a{i}"``/``"n{i}"`` -> int64 (c_i, 63)); ``meta`` (free-form JSON, provenance).
    """

    N: int
    M: int
    slice_ch: list[int]
    mean_frac_bits: int
    z_exp: np.ndarray
    y_exp: np.ndarray
    layers: dict[str, IntLayer]
    gelu_luts: np.ndarray
    thresholds: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check shapes, dtypes and every numeric bound the exactness argument relies on.

        Raises ValueError naming the offending entry.
        """
        S = len(self.slice_ch)
        if sum(self.slice_ch) != self.M or any(c < 1 for c in self.slice_ch):
            raise ValueError(f"portable params: slice_ch {self.slice_ch} does not sum to M={self.M}")
        if not 1 <= self.mean_frac_bits <= 24:
            raise ValueError(f"portable params: mean_frac_bits {self.mean_frac_bits} outside 1..24")
        for name, arr, n in (("z_exp", self.z_exp, self.N), ("y_exp", self.y_exp, self.M)):
            if arr.shape != (n,) or arr.dtype.kind != "i":
                raise ValueError(f"portable params: {name} must be int ({n},), got {arr.dtype} {arr.shape}")
            if (arr < -30).any() or (arr > 30).any():
                raise ValueError(f"portable params: {name} outside [-30, 30]")
        if (self.y_exp > self.mean_frac_bits).any():
            raise ValueError("portable params: y_exp must not exceed mean_frac_bits")
        luts = self.gelu_luts
        if luts.ndim != 2 or luts.shape[1] != 65536 or luts.dtype != np.int16:
            raise ValueError(f"portable params: gelu_luts must be int16 (L, 65536), got {luts.dtype} {luts.shape}")
        expected = _layer_names(S)
        missing = [n for n in expected if n not in self.layers]
        if missing:
            raise ValueError(f"portable params: missing layers {missing[:5]}{'...' if len(missing) > 5 else ''}")
        M2 = 2 * self.M
        for i, c in enumerate(self.slice_ch):
            prev = sum(self.slice_ch[:i])
            specs: dict[str, tuple[str, int, int, int, bool]] = {  # kind, in, out, k, final
                f"lc{i}": ("conv", c, 2 * c, 5, False),
                f"epa{i}.0": ("conv", M2 + (2 * c if i else 0), 2 * c * 5 // 3, 1, False),
                f"epa{i}.1": ("conv", 2 * c * 5 // 3, 2 * c * 4 // 3, 1, False),
                f"epa{i}.2": ("conv", 2 * c * 4 // 3, 2 * c, 1, True),
                f"epn{i}.0": ("conv", M2 + c * (4 if i else 2), 2 * c * 5 // 3, 1, False),
                f"epn{i}.1": ("conv", 2 * c * 5 // 3, 2 * c * 4 // 3, 1, False),
                f"epn{i}.2": ("conv", 2 * c * 4 // 3, 2 * c, 1, True),
            }
            if i:
                specs.update({
                    f"cc{i}.0": ("conv", prev, 224, 5, False),
                    f"cc{i}.1": ("conv", 224, 128, 5, False),
                    f"cc{i}.2": ("conv", 128, 2 * c, 5, False),
                })
            for name, (kind, cin, cout, k, final) in specs.items():
                self._check_layer(name, kind, cin, cout, k, final)
            for half in "an":
                t = self.thresholds.get(f"{half}{i}")
                if t is None or t.shape != (c, N_THRESHOLDS) or t.dtype != np.int64:
                    raise ValueError(f"portable params: thresholds {half}{i} must be int64 ({c}, {N_THRESHOLDS})")
                if (np.diff(t, axis=1) < 0).any():
                    raise ValueError(f"portable params: thresholds {half}{i} are not non-decreasing")
        N = self.N
        for name, (cin, cout, k, s) in {
            "hyper.0": (N, self.M, 5, 2), "hyper.1": (self.M, self.M * 3 // 2, 5, 2),
            "hyper.2": (self.M * 3 // 2, M2, 3, 1),
        }.items():
            self._check_layer(name, "deconv", cin, cout, k, False, stride=s)

    def _check_layer(self, name: str, kind: str, cin: int, cout: int, k: int, final: bool, stride: int = 1) -> None:
        L = self.layers[name]
        if L.kind != kind or L.in_channels != cin or L.out_channels != cout or L.k != k:
            raise ValueError(
                f"portable params: layer {name} is {L.kind} {L.in_channels}->{L.out_channels} k{L.k}, "
                f"expected {kind} {cin}->{cout} k{k} (params do not match this model)")
        if L.weight.dtype != np.int16 or (L.weight == INT16_MIN).any():
            raise ValueError(f"portable params: layer {name} weights must be int16 in [-32767, 32767]")
        if L.bias.shape != (cout,) or L.bias.dtype != np.int64:
            raise ValueError(f"portable params: layer {name} bias must be int64 ({cout},)")
        if L.shift.shape != (cout,) or L.shift.dtype.kind != "i":
            raise ValueError(f"portable params: layer {name} shift must be int ({cout},)")
        if L.stride != stride:
            raise ValueError(f"portable params: layer {name} stride {L.stride}, expected {stride}")
        bound = L.abs_sum() * 32767 + np.abs(L.bias)
        if (L.abs_sum() * 32767 >= GEMM_BOUND).any() or (bound >= GEMM_BOUND).any():
            raise ValueError(f"portable params: layer {name} can exceed 2^53 in its accumulator")
        sh = L.shift.astype(np.int64)
        if final:
            # Scale channels are compared unshifted; mean channels are shifted to the mean grid.
            c = cout // 2
            msh = sh[c:]
            if (msh < -40).any() or (msh > 62).any():
                raise ValueError(f"portable params: layer {name} mean shifts outside [-40, 62]")
            left = np.maximum(-msh, 0)
            if (bound[c:] >= (np.int64(1) << (62 - left))).any():
                raise ValueError(f"portable params: layer {name} mean requantisation can overflow int64")
            if L.act != ACT_NONE:
                raise ValueError(f"portable params: final layer {name} must not have an activation")
        else:
            if (sh < 0).any() or (sh > 62).any():
                raise ValueError(f"portable params: layer {name} shifts outside [0, 62]")
            if not (L.act == ACT_NONE or 0 <= L.act < self.gelu_luts.shape[0]):
                raise ValueError(f"portable params: layer {name} refers to GELU LUT {L.act} of {self.gelu_luts.shape[0]}")

    # ---------------------------------------------------------------- I/O
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The flat ``portable.npz`` mapping (see docs/portable-entropy.md, "Artifact")."""
        out: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION, np.int32),
            "N": np.array(self.N, np.int32), "M": np.array(self.M, np.int32),
            "slice_ch": np.array(self.slice_ch, np.int32),
            "mean_frac_bits": np.array(self.mean_frac_bits, np.int32),
            "z_exp": self.z_exp.astype(np.int32), "y_exp": self.y_exp.astype(np.int32),
            "gelu_luts": self.gelu_luts.astype(np.int16),
            "meta_json": np.frombuffer(json.dumps(self.meta, sort_keys=True).encode(), np.uint8),
        }
        for name, L in self.layers.items():
            out[f"{name}.w"] = L.weight.astype(np.int16)
            out[f"{name}.b"] = L.bias.astype(np.int64)
            out[f"{name}.shift"] = L.shift.astype(np.int32)
            out[f"{name}.cfg"] = np.array(
                [0 if L.kind == "conv" else 1, L.stride, L.padding, L.output_padding, L.act], np.int32)
        for key, t in self.thresholds.items():
            out[f"thr.{key}"] = t.astype(np.int64)
        return out

    def save(self, path: str | Path) -> str:
        """Validate, write ``portable.npz`` (compressed) and return its sha256."""
        self.validate()
        path = Path(path)
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.to_arrays())
        path.write_bytes(buf.getvalue())
        return hashlib.sha256(buf.getvalue()).hexdigest()

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray]) -> "PortableParams":
        """Build from the npz mapping; raises ValueError on anything missing or malformed."""
        try:
            version = int(d["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"portable params: format version {version}, this runtime reads {FORMAT_VERSION}")
            slice_ch = [int(c) for c in np.asarray(d["slice_ch"]).reshape(-1)]
            layers: dict[str, IntLayer] = {}
            for name in _layer_names(len(slice_ch)):
                cfg = np.asarray(d[f"{name}.cfg"]).astype(np.int64).reshape(-1)
                if cfg.shape != (5,) or cfg[0] not in (0, 1):
                    raise ValueError(f"portable params: layer {name} has a malformed cfg")
                layers[name] = IntLayer(
                    name=name, kind="conv" if cfg[0] == 0 else "deconv",
                    weight=np.asarray(d[f"{name}.w"]), bias=np.asarray(d[f"{name}.b"]),
                    shift=np.asarray(d[f"{name}.shift"]), act=int(cfg[4]),
                    stride=int(cfg[1]), padding=int(cfg[2]), output_padding=int(cfg[3]))
                if layers[name].weight.ndim != 4:
                    raise ValueError(f"portable params: layer {name} weight must be 4-D")
            thresholds = {f"{h}{i}": np.asarray(d[f"thr.{h}{i}"]) for i in range(len(slice_ch)) for h in "an"}
            meta = json.loads(bytes(np.asarray(d["meta_json"], np.uint8)).decode()) if "meta_json" in d else {}
            params = cls(
                N=int(d["N"]), M=int(d["M"]), slice_ch=slice_ch, mean_frac_bits=int(d["mean_frac_bits"]),
                z_exp=np.asarray(d["z_exp"]), y_exp=np.asarray(d["y_exp"]), layers=layers,
                gelu_luts=np.asarray(d["gelu_luts"]), thresholds=thresholds, meta=meta)
        except KeyError as exc:
            raise ValueError(f"portable params: missing entry {exc}") from None
        except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"portable params: malformed entry ({exc})") from None
        params.validate()
        return params

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> "PortableParams":
        """Read and validate ``portable.npz``; with ``sha256``, the file hash must match.

        A truncated, corrupted or foreign file raises ValueError with the reason.
        """
        path = Path(path)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read portable params ({exc})") from None
        if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
            raise ValueError(f"{path}: sha256 mismatch (file changed or belongs to other artifacts)")
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a readable portable.npz ({type(exc).__name__}: {exc})") from None
        try:
            return cls.from_arrays(arrays)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def check_model(self, N: int, M: int, slice_ch: Sequence[int]) -> None:
        """Raise ValueError unless these params belong to a model of these sizes."""
        if (self.N, self.M, list(self.slice_ch)) != (int(N), int(M), [int(c) for c in slice_ch]):
            raise ValueError(
                f"portable params are for N={self.N} M={self.M} slice_ch={self.slice_ch}, "
                f"the model has N={N} M={M} slice_ch={list(slice_ch)}")


# =========================================================================== checkerboard

def half_positions(h: int, w: int, half: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of one checkerboard half in stream (squeezed, row-major) order.

    Anchors: even rows take odd columns, odd rows even columns; non-anchors the reverse.
    """
    if w % 2:
        raise ValueError(f"checkerboard needs an even latent width, got {w}")
    r = np.repeat(np.arange(h), w // 2)
    j = np.tile(np.arange(w // 2), h)
    parity = (1 - r % 2) if half == "anchor" else (r % 2)
    return r, 2 * j + parity


# =========================================================================== networks

@dataclass
class PortableResult:
    """What the encoder produces: the y string, the float y_hat and the coded integers."""

    y_string: bytes
    y_hat: np.ndarray  # (1, M, H, W) float32, input of the content decoder
    symbols: np.ndarray  # int32, stream order
    indexes: np.ndarray  # int32, stream order
    y_hat_int: np.ndarray  # (M, H, W) int64, y_hat on the grid 2^-F


class PortableContextModel:
    """The integer hyper decoder + context model over one :class:`PortableParams`.

    ``gemm`` selects how the exact integer products are computed: ``"float64"`` (BLAS,
    fast) or ``"int64"`` (numpy integer matmul, slow, for cross-checks). Both give the
    same integers by construction; tests assert it.
    """

    def __init__(self, params: PortableParams, gemm: str = "float64") -> None:
        if gemm not in ("float64", "int64"):
            raise ValueError(f"gemm must be 'float64' or 'int64', got {gemm!r}")
        params.validate()
        self.p = params
        self.gemm = gemm
        self.F = int(params.mean_frac_bits)
        self._luts = params.gelu_luts.astype(np.int64)

    # ---------------------------------------------------------------- layers
    def _act(self, L: IntLayer, acc: np.ndarray) -> np.ndarray:
        """Requantise (per output channel) to int16, then the GELU LUT if the layer has one."""
        shape = (-1,) + (1,) * (acc.ndim - 1)
        y = sat16(round_shift(acc, L.shift.astype(np.int64).reshape(shape)))
        if L.act != ACT_NONE:
            y = self._luts[L.act][y.astype(np.int64) + 32768].astype(np.int16)
        return y

    def _conv_acc(self, L: IntLayer, x: np.ndarray,
                  pos: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Accumulator of a stride-1 'same' conv. x: int16 (C, H, W) -> int64 (O, H, W),
        or (O, n) at the positions ``pos`` (1x1 layers take x as (C, n) directly)."""
        # Widen before im2col so the (large) column matrix is built by one copy.
        x = x.astype(np.float64 if self.gemm == "float64" else np.int64)
        if L.k == 1 and x.ndim == 2:
            cols = x
        else:
            k, p = L.k, L.padding
            xp = np.pad(x, ((0, 0), (p, p), (p, p)))
            win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))  # (C, H, W, k, k)
            if pos is not None:
                win = win[:, pos[0], pos[1]]  # (C, n, k, k)
                cols = win.transpose(0, 2, 3, 1).reshape(x.shape[0] * k * k, -1)
            else:
                cols = win.transpose(0, 3, 4, 1, 2).reshape(x.shape[0] * k * k, -1)
        acc = _gemm(L.wmat(), cols, self.gemm) if self.gemm == "float64" else _gemm(
            L.weight.reshape(L.out_channels, -1), cols, self.gemm)
        acc += L.bias[:, None]
        if pos is None and not (L.k == 1 and x.ndim == 2):
            acc = acc.reshape(L.out_channels, x.shape[1], x.shape[2])
        return acc

    def _deconv_acc(self, L: IntLayer, x: np.ndarray) -> np.ndarray:
        """Accumulator of a transposed conv (torch ConvTranspose2d semantics)."""
        C, H, W = x.shape
        k, s, p, op, O = L.k, L.stride, L.padding, L.output_padding, L.out_channels
        xm = x.reshape(C, H * W)
        if self.gemm == "float64":
            prod = _gemm(L.wmat(), xm, self.gemm)
        else:
            prod = _gemm(L.weight.transpose(1, 2, 3, 0).reshape(-1, C), xm, self.gemm)
        prod = prod.reshape(O, k, k, H, W)
        Ho, Wo = (H - 1) * s - 2 * p + k + op, (W - 1) * s - 2 * p + k + op
        full = np.zeros((O, max((H - 1) * s + k, p + Ho), max((W - 1) * s + k, p + Wo)), np.int64)
        for kh in range(k):
            for kw in range(k):
                full[:, kh:kh + (H - 1) * s + 1:s, kw:kw + (W - 1) * s + 1:s] += prod[:, kh, kw]
        return full[:, p:p + Ho, p:p + Wo] + L.bias[:, None, None]

    def _run3(self, prefix: str, x: np.ndarray) -> np.ndarray:
        """Three 'same' conv layers (GELU LUTs between); returns the last layer's int16 output."""
        for j in range(3):
            L = self.p.layers[f"{prefix}.{j}"]
            x = self._act(L, self._conv_acc(L, x))
        return x

    # ---------------------------------------------------------------- public pieces
    def hyper_input(self, z_hat: np.ndarray) -> np.ndarray:
        """int16 (N, h, w) hyper decoder input: sat16(floor(z_hat * 2^z_exp[c] + 1/2)).

        ``z_hat`` must hold float32 values (as decode_z/encode_z produce); float64 arrays
        holding the same values give the same integers (the product by 2^e, the +1/2 and
        the floor are exact in float64).
        """
        z = np.asarray(z_hat)
        if z.ndim == 4 and z.shape[0] == 1:
            z = z[0]
        if z.ndim != 3 or z.shape[0] != self.p.N:
            raise ValueError(f"z_hat must be ({self.p.N}, h, w), got {z.shape}")
        if z.dtype != np.float32:
            z32 = z.astype(np.float32)
            if not np.array_equal(z32.astype(z.dtype), z):
                raise ValueError("z_hat values must be float32 numbers (z symbols + float32 medians)")
            z = z32
        if not np.isfinite(z).all():
            raise ValueError("z_hat is not finite")
        e = np.ldexp(1.0, self.p.z_exp.astype(np.int64))[:, None, None]
        v = np.floor(np.clip(z.astype(np.float64) * e, -1e9, 1e9) + 0.5)
        return sat16(v.astype(np.int64))

    def hyper(self, z_hat: np.ndarray) -> np.ndarray:
        """Integer hyper decoder: z_hat (N, h, w) -> hyper_params int16 (2M, 4h, 4w)."""
        x = self.hyper_input(z_hat)
        for j in range(3):
            L = self.p.layers[f"hyper.{j}"]
            x = self._act(L, self._deconv_acc(L, x))
        return x

    def y_fixed(self, y: np.ndarray) -> np.ndarray:
        """Encoder: y (float32) on the grid 2^-F: floor(clamp(y, ±2^24) * 2^F + 1/2), int64."""
        y64 = np.clip(np.asarray(y, np.float32).astype(np.float64), -(2.0 ** Y_LIMIT_LOG2), 2.0 ** Y_LIMIT_LOG2)
        if np.isnan(y64).any():
            raise ValueError("y contains NaN")
        return np.floor(y64 * float(1 << self.F) + 0.5).astype(np.int64)

    def _ctx_input(self, y_hat_int: np.ndarray, c0: int, c1: int) -> np.ndarray:
        """Context-network input of channels [c0, c1): sat16(RS(y_hat_int, F - y_exp[c]))."""
        sh = (self.F - self.p.y_exp[c0:c1].astype(np.int64))[:, None, None]
        return sat16(round_shift(y_hat_int[c0:c1], sh))

    def _head(self, prefix: str, half: str, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entropy-parameter head on (C_in, n) inputs -> (indexes int32 (c, n), means int64 (c, n))."""
        for j in range(2):
            L = self.p.layers[f"{prefix}{i}.{j}"]
            x = self._act(L, self._conv_acc(L, x))
        L = self.p.layers[f"{prefix}{i}.2"]
        acc = self._conv_acc(L, x)
        c = self.p.slice_ch[i]
        thr = self.p.thresholds[f"{half}{i}"]
        # index = #{k in 0..62 : scale_acc > T[c, k]}; T is non-decreasing per channel.
        idx = np.empty((c, acc.shape[1]), np.int32)
        for ch in range(c):
            idx[ch] = np.searchsorted(thr[ch], acc[ch], side="left")
        lim = np.int64(1) << (self.F + MEAN_LIMIT_LOG2)
        means = np.clip(round_shift(acc[c:], L.shift[c:].astype(np.int64)[:, None]), -lim, lim)
        return idx, means

    # ---------------------------------------------------------------- slice loop
    def run(self, z_hat: np.ndarray, code: Callable[[int, str, np.ndarray, np.ndarray], np.ndarray]
            ) -> np.ndarray:
        """Walk slices x (anchor, non-anchor); returns y_hat_int (M, H, W) int64.

        ``code(i, half, indexes, means)`` receives the int32 CDF indexes and the int64
        means (grid 2^-F) of one half-slice, both (c_i, n) in stream order, and returns
        the int symbols (c_i, n) (computed from y when encoding, read from the coder
        when decoding).
        """
        hyper = self.hyper(z_hat)
        _, H, W = hyper.shape
        M, F = self.p.M, self.F
        y_hat = np.zeros((M, H, W), np.int64)
        pa, pn = half_positions(H, W, "anchor"), half_positions(H, W, "nonanchor")
        hyp_a, hyp_n = hyper[:, pa[0], pa[1]], hyper[:, pn[0], pn[1]]
        c0 = 0
        for i, c in enumerate(self.p.slice_ch):
            c1 = c0 + c
            if i:
                cc = self._run3(f"cc{i}", self._ctx_input(y_hat, 0, c0))
                a_in = np.concatenate([cc[:, pa[0], pa[1]], hyp_a])
            else:
                cc = None
                a_in = hyp_a
            idx, mu = self._head("epa", "a", i, a_in)
            sym = np.asarray(code(i, "anchor", idx, mu), np.int64).reshape(c, -1)
            y_hat[c0:c1, pa[0], pa[1]] = sym * (1 << F) + mu
            L = self.p.layers[f"lc{i}"]
            # y_hat of slice i holds only anchors so far: exactly the masked anchor map.
            lc = self._act(L, self._conv_acc(L, self._ctx_input(y_hat, c0, c1), pn))
            n_in = [lc] + ([cc[:, pn[0], pn[1]]] if cc is not None else []) + [hyp_n]
            idx, mu = self._head("epn", "n", i, np.concatenate(n_in))
            sym = np.asarray(code(i, "nonanchor", idx, mu), np.int64).reshape(c, -1)
            y_hat[c0:c1, pn[0], pn[1]] = sym * (1 << F) + mu
            c0 = c1
        return y_hat

    def to_float(self, y_hat_int: np.ndarray) -> np.ndarray:
        """float32 y_hat (1, M, H, W) for the content decoder: y_hat_int * 2^-F."""
        return np.ldexp(y_hat_int.astype(np.float64), -self.F).astype(np.float32)[None]

    def symbols(self, y: np.ndarray, z_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encoder without the coder: (symbols int32, indexes int32, y_hat_int) in stream order."""
        yy = np.asarray(y)
        if yy.ndim == 4 and yy.shape[0] == 1:
            yy = yy[0]
        if yy.ndim != 3 or yy.shape[0] != self.p.M:
            raise ValueError(f"y must be ({self.p.M}, H, W), got {np.asarray(y).shape}")
        yf = self.y_fixed(yy)
        H, W = yf.shape[1:]
        pos = {"anchor": half_positions(H, W, "anchor"), "nonanchor": half_positions(H, W, "nonanchor")}
        starts = np.cumsum([0] + list(self.p.slice_ch))
        syms: list[np.ndarray] = []
        idxs: list[np.ndarray] = []
        half = np.int64(1) << (self.F - 1)

        def code(i: int, h: str, indexes: np.ndarray, means: np.ndarray) -> np.ndarray:
            r, cidx = pos[h]
            v = yf[starts[i]:starts[i + 1], r, cidx]
            s = np.clip((v - means + half) >> self.F, -SYMBOL_LIMIT, SYMBOL_LIMIT)
            syms.append(s.reshape(-1))
            idxs.append(indexes.reshape(-1))
            return s

        hyper_hw = (np.asarray(z_hat).shape[-2] * 4, np.asarray(z_hat).shape[-1] * 4)
        if hyper_hw != (H, W):
            raise ValueError(f"y is {H}x{W} but z_hat gives a {hyper_hw[0]}x{hyper_hw[1]} latent")
        y_hat = self.run(z_hat, code)
        return (np.concatenate(syms).astype(np.int32), np.concatenate(idxs).astype(np.int32), y_hat)

    def encode(self, y: np.ndarray, z_hat: np.ndarray, tables: GaussianTables, fmt: str = "compat") -> PortableResult:
        """Code y given the (already coded) z_hat; one rANS stream in stream order."""
        sym, idx, y_hat = self.symbols(y, z_hat)
        if idx.size and int(idx.max()) >= tables.num_rows:
            raise ValueError(f"CDF index {int(idx.max())} but the tables have {tables.num_rows} rows")
        stream = encode_with_indexes(sym, idx, tables, fmt)
        return PortableResult(stream, self.to_float(y_hat), sym, idx, y_hat)

    def decode(self, y_string: bytes, z_hat: np.ndarray, tables: GaussianTables, fmt: str = "compat"
               ) -> tuple[np.ndarray, np.ndarray]:
        """Decode a portable y string: (y_hat float32 (1, M, H, W), y_hat_int (M, H, W)).

        Raises ValueError on a corrupted/truncated stream (from the rANS core).
        """
        dec = _index_decoder(y_string, tables, fmt)

        def code(i: int, h: str, indexes: np.ndarray, means: np.ndarray) -> np.ndarray:
            return np.asarray(dec.decode(np.ascontiguousarray(indexes.reshape(-1), np.int32)))

        y_hat = self.run(z_hat, code)
        dec.finish()
        return self.to_float(y_hat), y_hat


def _index_decoder(stream: bytes, tables: GaussianTables, fmt: str) -> Any:
    return entropy_coding.IndexDecoder(stream, tables, fmt)


# =========================================================================== convenience

def portable_encode_y(y: np.ndarray, z_hat: np.ndarray, params: PortableParams, tables: GaussianTables,
                      fmt: str = "compat") -> tuple[bytes, np.ndarray]:
    """(y_string, y_hat float32 (1, M, H, W)) of the portable path."""
    r = PortableContextModel(params).encode(y, z_hat, tables, fmt)
    return r.y_string, r.y_hat


def portable_decode_y(y_string: bytes, z_hat: np.ndarray, params: PortableParams, tables: GaussianTables,
                      fmt: str = "compat") -> np.ndarray:
    """y_hat float32 (1, M, H, W) decoded from a portable y string."""
    return PortableContextModel(params).decode(y_string, z_hat, tables, fmt)[0]
