"""The empty-prompt context of SD 2.1's OpenCLIP ViT-H/14 text encoder, without open_clip.

DiffEIC conditions the UNet on ``get_learned_conditioning([""])`` only, so the text
encoder is needed once, to compute one constant (1, 77, width) tensor that is then
folded into the cross-attention (see ``ControlledUNet.fold_context``). This module
owns that computation, following ``FrozenOpenCLIPEmbedder(layer="penultimate")``:

* tokens of ``""``: ``[49406 (SOT), 49407 (EOT), 0 x 75]`` (open_clip pads with 0);
* ``token_embedding + positional_embedding``;
* the transformer's residual blocks except the last one (pre-LN, causal mask,
  ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with exact GELU);
* ``ln_final``.

Weights come from ``cond_stage_model.model.*`` (pass ``extract(state, "text")``).

Status: checked against an independent ``nn.MultiheadAttention`` implementation on
random weights only. It has NOT been verified against real open_clip / SD 2.1 weights
(the golden fixture ships no text encoder). Assumptions to verify there: heads =
width // 64 (16 for ViT-H), GELU not QuickGELU, no LayerScale (``ls_1``/``ls_2``).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

SOT_TOKEN = 49406
EOT_TOKEN = 49407
CONTEXT_LENGTH = 77


def empty_prompt_tokens(length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """open_clip.tokenize([""]): SOT, EOT, then zero padding; shape (1, length) int64."""
    tokens = torch.zeros(1, length, dtype=torch.long)
    tokens[0, 0] = SOT_TOKEN
    tokens[0, 1] = EOT_TOKEN
    return tokens


def _strip(text_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Accept keys with or without the open_clip "model." prefix of FrozenOpenCLIPEmbedder.
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in text_state.items()}


def _layer_norm(x: torch.Tensor, s: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    w = s[f"{name}.weight"]
    # open_clip's LayerNorm computes in float32 and uses the default eps 1e-5.
    return F.layer_norm(x.float(), (w.shape[0],), w.float(), s[f"{name}.bias"].float(), 1e-5).to(x.dtype)


@torch.no_grad()
def empty_prompt_context(
    text_state: Mapping[str, torch.Tensor],
    heads: Optional[int] = None,
    skip_last: int = 1,
) -> torch.Tensor:
    """The (1, 77, width) context for the empty prompt (``layer="penultimate"`` by default).

    ``text_state`` holds ``token_embedding.weight``, ``positional_embedding``,
    ``transformer.resblocks.<i>.*`` and ``ln_final.*`` (with or without ``model.``).
    ``heads`` defaults to ``width // 64`` (open_clip's head width). ``skip_last`` is the
    number of final blocks not run (1 = penultimate, 0 = last).
    """
    s = _strip(text_state)
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight"):
        if key not in s:
            raise KeyError(f"text encoder state lacks '{key}' (pass extract(state, 'text') of an SD 2.x checkpoint)")
    layers = sorted({int(m.group(1)) for k in s if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    if layers != list(range(len(layers))):
        raise KeyError(f"text encoder resblocks are not numbered 0..n-1: {layers}")
    if any(".ls_1." in k or ".ls_2." in k for k in s):
        raise NotImplementedError("text encoder with LayerScale (ls_1/ls_2) is not supported")
    pos = s["positional_embedding"].float()
    length, width = pos.shape
    heads = heads or width // 64
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    dh = width // heads

    tokens = empty_prompt_tokens(length)
    x = F.embedding(tokens, s["token_embedding.weight"].float()) + pos  # (1, L, W)
    # Causal mask as open_clip's build_attention_mask: -inf strictly above the diagonal.
    mask = torch.full((length, length), float("-inf")).triu_(1)

    for i in layers[: len(layers) - skip_last]:
        p = f"transformer.resblocks.{i}."
        h = _layer_norm(x, s, p + "ln_1")
        qkv = F.linear(h, s[p + "attn.in_proj_weight"].float(), s[p + "attn.in_proj_bias"].float())
        q, k, v = (t.reshape(1, length, heads, dh).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        att = torch.matmul(q * dh ** -0.5, k.transpose(-1, -2)) + mask
        o = torch.matmul(att.softmax(dim=-1), v).transpose(1, 2).reshape(1, length, width)
        x = x + F.linear(o, s[p + "attn.out_proj.weight"].float(), s[p + "attn.out_proj.bias"].float())
        h = _layer_norm(x, s, p + "ln_2")
        h = F.gelu(F.linear(h, s[p + "mlp.c_fc.weight"].float(), s[p + "mlp.c_fc.bias"].float()))
        x = x + F.linear(h, s[p + "mlp.c_proj.weight"].float(), s[p + "mlp.c_proj.bias"].float())
    return _layer_norm(x, s, "ln_final")
