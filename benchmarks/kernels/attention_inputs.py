"""FLUX-like attention inputs for the quantised attention's accuracy checks: q and k as FLUX's blocks make them
(per-head RMSNorm with a learned weight, then FLUX's 3-axis rotary embedding at real text/image positions), with the
structure that makes quantisation hard, at a chosen strength. Random weights give none of it (their attention is
near uniform), and no real checkpoint can be downloaded here, so this is a proxy: its regimes span near-uniform to
near-one-hot attention. Measure a real checkpoint with `python -m engine.bench --preset <fp8attn preset>` (PSNR
against the bf16 preset) to see where real activations fall.

Regimes (per-channel weight spread, outlier-channel gain, logit temperature):
- diffuse:  weights close to 1, mild logits (attention entropy ~6 of ~7 nats at 1152 tokens)
- offsets:  channel offsets shared by all tokens (what SageAttention's K smoothing targets), moderate spread
- outliers: 4 channels per head 3x larger, wider spread (entropy ~3 nats)
- peaky:    logits doubled (entropy ~1 nat: a few keys take nearly all the weight)
"""

from __future__ import annotations

import math

import torch

REGIMES = {  # spread, outlier gain, temperature
    "diffuse": (0.2, 1.0, 0.5),
    "offsets": (0.3, 2.0, 1.0),
    "outliers": (0.5, 3.0, 1.0),
    "peaky": (0.3, 1.0, 2.0),
}
TEXT_WEIGHT_GAIN = 1.5  # the text stream's own norm weights (norm_added_q/k), larger here than the image's
OUTLIER_CHANNELS = 4


def image_grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) of an image of `tokens` latent patches, as square as the count allows."""
    rows = int(math.isqrt(tokens))
    while tokens % rows:
        rows -= 1
    return rows, tokens // rows


def rotary(text_tokens: int, image_tokens: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's cos/sin [L, D] (axes 16/56/56 scaled to head_dim, theta 10000) at text positions 0 and an image grid."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    rows, cols = image_grid(image_tokens)
    ids = torch.zeros(text_tokens + image_tokens, 3)
    ids[text_tokens:, 1] = torch.arange(rows).repeat_interleave(cols).float()
    ids[text_tokens:, 2] = torch.arange(cols).repeat(rows).float()
    axes = [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16]
    cos, sin = FluxPosEmbed(10000, axes)(ids)
    return cos.to(device), sin.to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(-2)
    return x * cos + rotated * sin


def flux_like_qkv(text_tokens: int, image_tokens: int, heads: int, head_dim: int, regime: str = "offsets",
                  device="cpu", seed: int = 0, dtype=torch.bfloat16):  # fmt: skip
    """q, k, v [1, H, L, D] in `dtype` (L = text + image tokens), post-RMSNorm and rotary as FLUX's blocks."""
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r} is not one of {sorted(REGIMES)}")
    spread, outlier_gain, temperature = REGIMES[regime]
    generator = torch.Generator().manual_seed(seed)
    tokens = text_tokens + image_tokens
    cos, sin = rotary(text_tokens, image_tokens, head_dim, "cpu")
    is_text = (torch.arange(tokens) < text_tokens)[:, None, None]
    out = []
    for _ in range(2):  # q, then k
        x = torch.randn(tokens, heads, head_dim, generator=generator)
        x = x + 1.5 * torch.randn(heads, head_dim, generator=generator)  # offsets shared by every token
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        weight = torch.exp(spread * torch.randn(heads, head_dim, generator=generator))
        outliers = torch.randperm(head_dim, generator=generator)[:OUTLIER_CHANNELS]
        weight[:, outliers] *= outlier_gain
        x = torch.where(is_text, x * weight * TEXT_WEIGHT_GAIN, x * weight) * temperature
        out.append(_rotate(x, cos[:, None], sin[:, None]))
    v = torch.randn(tokens, heads, head_dim, generator=generator)
    v = v * torch.exp(0.5 * torch.randn(heads, head_dim, generator=generator))
    v = v + torch.randn(heads, head_dim, generator=generator)
    return tuple(t.transpose(0, 1)[None].to(device=device, dtype=dtype).contiguous() for t in (*out, v))


def per_head_cosine(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each (batch, head)'s whole output [L, D] with the reference's: [B * H]."""
    a, b = out.float().flatten(2).flatten(0, 1), reference.float().flatten(2).flatten(0, 1)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


__all__ = ["REGIMES", "flux_like_qkv", "image_grid", "per_head_cosine", "rotary"]
