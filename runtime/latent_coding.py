"""The latent-coding loop: 10 channel slices x checkerboard (anchor, non-anchor).

This is the ELIC-style context model of the LFGCM, driven from exported graphs. For
slice ``i`` the anchor parameters come from the hyper parameters and the channel context
of the already-coded slices; the non-anchor parameters add a local context computed from
the dequantized anchors (zeros at non-anchor positions). Encoder and decoder walk the
same loop; only the coder call differs (``encode_half`` vs ``decode_half``), so they
share one function. Symbol order is the official one: slice by slice, anchor half then
non-anchor half, all in one rANS stream.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

RunFn = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


class HalfCoder(Protocol):
    """YEncoder/YDecoder seen through one method: code one checkerboard half."""

    def __call__(self, scales: np.ndarray, means: np.ndarray, half: str, c0: int, c1: int) -> np.ndarray: ...


def code_slices(
    run: RunFn,
    hyper_params: np.ndarray,
    slice_ch: Sequence[int],
    code_half: HalfCoder,
) -> np.ndarray:
    """Walk all slices; returns y_hat (1, M, h, w) float32.

    ``run(network, inputs)`` evaluates ``ctx_anchor_i`` / ``ctx_nonanchor_i``;
    ``code_half(scales, means, half, c0, c1)`` codes one half of channels [c0, c1) and
    returns the dequantized values at that half's positions (zeros elsewhere), (C, h, w).
    """
    _, _, h, w = hyper_params.shape
    y_hat = np.zeros((1, sum(slice_ch), h, w), np.float32)
    c0 = 0
    for i, c in enumerate(slice_ch):
        c1 = c0 + c
        a_in = {"hyper_params": hyper_params}
        if i:
            a_in["y_prev"] = y_hat[:, :c0]
        a_out = run(f"ctx_anchor_{i}", a_in)
        params = a_out["params"][0]
        anchor_hat = code_half(params[:c], params[c:], "anchor", c0, c1)
        n_in = {"anchor_hat": anchor_hat[None], "hyper_params": hyper_params}
        if i:
            n_in["channel_ctx"] = a_out["channel_ctx"]
        params = run(f"ctx_nonanchor_{i}", n_in)["params"][0]
        nonanchor_hat = code_half(params[:c], params[c:], "nonanchor", c0, c1)
        y_hat[0, c0:c1] = anchor_hat + nonanchor_hat
        c0 = c1
    return y_hat
