"""Per-network export specs: I/O names, dtypes, dynamic axes and shape profiles.

Every spatial size in DiffEIC is a multiple of the z grid (1/64 of the padded image), so
all dynamic axes are written in units of that grid: ``zh``/``zw`` are the padded image
size divided by 64 and a tensor at 1/8 resolution has spatial shape ``(8*zh, 8*zw)``.
Axis names in the ONNX graphs say the factor (``H``, ``h8``, ``h16``, ``h64``...). The
profile (min/opt/max) is given in pixels and converted per axis here, so the ONNX
export, the TensorRT builder and the runtime all agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.manifest import TensorSpec

from .config import DiffEICConfig

# Resolution factor (pixels per unit) of each spatial axis family.
AXIS_FACTORS = {1: ("H", "W"), 8: ("h8", "w8"), 16: ("h16", "w16"), 64: ("h64", "w64")}


@dataclass(frozen=True)
class PixelProfile:
    """Image sizes (padded, pixels) an artifact set is exported and built for."""

    min_hw: tuple[int, int] = (64, 64)
    opt_hw: tuple[int, int] = (512, 768)
    max_hw: tuple[int, int] = (2048, 2048)

    def __post_init__(self) -> None:
        for hw in (self.min_hw, self.opt_hw, self.max_hw):
            if hw[0] % 64 or hw[1] % 64 or min(hw) <= 0:
                raise ValueError(f"profile size {hw} must be positive multiples of 64")
        if not all(self.min_hw[k] <= self.opt_hw[k] <= self.max_hw[k] for k in (0, 1)):
            raise ValueError(f"profile must satisfy min <= opt <= max, got {self.min_hw}, {self.opt_hw}, {self.max_hw}")

    def axes(self) -> dict[str, tuple[int, int, int]]:
        out: dict[str, tuple[int, int, int]] = {}
        for factor, (hn, wn) in AXIS_FACTORS.items():
            for k, name in ((0, hn), (1, wn)):
                out[name] = (self.min_hw[k] // factor, self.opt_hw[k] // factor, self.max_hw[k] // factor)
        return out


@dataclass(frozen=True)
class NetworkSpec:
    """What one exported graph takes and returns."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Whether the graph may run in reduced precision (FP16 TensorRT). Networks on the
    # parsing path (hyper decoder, context model) must not: see README, "what runs where".
    fp16_safe: bool = True
    notes: str = ""
    axes: tuple[str, ...] = field(default=())

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX ``dynamic_axes`` mapping for every tensor with symbolic dims."""
        out: dict[str, dict[int, str]] = {}
        for t in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if dyn:
                out[t.name] = dyn
        return out


def _t(name: str, channels: int, factor: int, dtype: str = "float32") -> TensorSpec:
    hn, wn = AXIS_FACTORS[factor]
    return TensorSpec(name, dtype, (1, channels, hn, wn))


def control_residual_names(n_enc: int, n_dec: int) -> list[str]:
    return [f"ctrl_enc_{k}" for k in range(n_enc)] + ["ctrl_mid"] + [f"ctrl_dec_{k}" for k in range(n_dec)]


def network_specs(cfg: DiffEICConfig, residual_channels: list[tuple[int, int]] | None = None) -> dict[str, NetworkSpec]:
    """All networks of one configuration.

    ``residual_channels`` lists (channels, downsampling factor relative to the latent) of
    every control residual, as the built control module reports them; without it the
    separate control/UNet graphs are left out.
    """
    lf = cfg.lfgcm
    M, N, slice_ch = lf["M"], lf["N"], list(lf["slice_ch"])
    latent_c = cfg.unet["in_channels"]
    specs: dict[str, NetworkSpec] = {}
    specs["image_encoder"] = NetworkSpec(
        "image_encoder", (_t("image", 3, 1),), (_t("y", M, 16), _t("z", N, 64)),
        fp16_safe=False,
        notes="SD VAE encoder (mode, scaled) -> LFGCM analysis. Its y feeds the rANS coder directly.",
    )
    # The image encoder in two parts, for tiled encoding of large images (runtime.tiling):
    # the SD VAE encoder runs tile by tile, the LFGCM analysis once on the whole image.
    specs["vae_encoder"] = NetworkSpec(
        "vae_encoder", (_t("image", 3, 1),), (_t("z_g", latent_c, 8),), fp16_safe=False,
        notes="z_g = SD VAE encoder mode * scale_factor of image * 2 - 1 (the first half of image_encoder)",
    )
    specs["lfgcm_analysis"] = NetworkSpec(
        "lfgcm_analysis", (_t("image", 3, 1), _t("z_g", latent_c, 8)), (_t("y", M, 16), _t("z", N, 64)),
        fp16_safe=False, notes="LFGCM analysis and hyper analysis given z_g (the second half of image_encoder)",
    )
    specs["hyper_decoder"] = NetworkSpec(
        "hyper_decoder", (_t("z_hat", N, 64),), (_t("hyper_params", 2 * M, 16), _t("f_c", N // 4, 16)),
        fp16_safe=False, notes="on the parsing path: must compute the same floats on encoder and decoder",
    )
    for i, c in enumerate(slice_ch):
        prev = sum(slice_ch[:i])
        a_in = (_t("hyper_params", 2 * M, 16),) + ((_t("y_prev", prev, 16),) if i else ())
        a_out = (_t("params", 2 * c, 16),) + ((_t("channel_ctx", 2 * c, 16),) if i else ())
        specs[f"ctx_anchor_{i}"] = NetworkSpec(f"ctx_anchor_{i}", a_in, a_out, fp16_safe=False)
        n_in = (_t("anchor_hat", c, 16), _t("hyper_params", 2 * M, 16)) + ((_t("channel_ctx", 2 * c, 16),) if i else ())
        specs[f"ctx_nonanchor_{i}"] = NetworkSpec(f"ctx_nonanchor_{i}", n_in, (_t("params", 2 * c, 16),), fp16_safe=False)
    specs["content_decoder"] = NetworkSpec(
        "content_decoder", (_t("y_hat", M, 16), _t("f_c", N // 4, 16)), (_t("c_latent", lf["out_nc"], 8),),
    )
    t_spec = TensorSpec("t", "float32", (1,))
    unet_in = (_t("x_t", latent_c, 8), t_spec)
    specs["control_unet"] = NetworkSpec(
        "control_unet", unet_in + (_t("c_latent", lf["out_nc"], 8),), (_t("eps", latent_c, 8),),
        notes="control module + SD UNet in one graph, empty-prompt cross-attention K/V folded to constants",
    )
    if residual_channels is not None:
        n = len(residual_channels)
        n_enc = (n - 1) // 2
        names = control_residual_names(n_enc, n - 1 - n_enc)
        res = tuple(
            TensorSpec(nm, "float32", (1, ch, f"h8/{f}" if f > 1 else "h8", f"w8/{f}" if f > 1 else "w8"))
            for nm, (ch, f) in zip(names, residual_channels)
        )
        specs["control"] = NetworkSpec("control", unet_in + (_t("c_latent", lf["out_nc"], 8),), res)
        specs["unet"] = NetworkSpec("unet", unet_in + res, (_t("eps", latent_c, 8),))
    specs["vae_decoder"] = NetworkSpec(
        "vae_decoder", (_t("latent", latent_c, 8),), (_t("decoded", 3, 1),),
        notes="decoder(post_quant_conv(z / scale_factor)); output unclamped in [-1, 1]",
    )
    return specs
