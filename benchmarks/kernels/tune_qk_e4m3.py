"""Tune the QK-norm kernel's e4m3 path (the cuDNN preset's) at every size class of FLUX's token counts, as the
double-stream blocks call it (text and image apart) and the single-stream blocks do (one joint sequence), and keep
the choices where FLUX_KERNELS_TUNING_DIR points: merged into kernels/tuned/<card>.json they spare a fresh machine the
autotuning of these keys (0.7-0.9 s of the cuDNN preset's first call; benchmarks/NOTES.md 2026-12-01).

    FLUX_KERNELS_TUNING=retune FLUX_KERNELS_TUNING_DIR=out/tuned python -m benchmarks.kernels.tune_qk_e4m3
"""

from __future__ import annotations

import torch

from flux_kernels.cudnn_attention import qk_norm_rope_e4m3_pairs

HEADS, HEAD_DIM = 24, 128
IMAGE_TOKENS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)  # one of each size class
TEXT_TOKENS = (256, 512)


def main() -> int:
    device = torch.device("cuda")
    width = 3 * HEADS * HEAD_DIM
    weights = [torch.rand(HEAD_DIM, device=device, dtype=torch.bfloat16) + 0.5 for _ in range(4)]
    for text in TEXT_TOKENS:
        for image in IMAGE_TOKENS:
            total = text + image
            cos, sin = (torch.rand(total, HEAD_DIM, device=device) for _ in range(2))
            qkv = torch.randn(1, image, width, device=device, dtype=torch.bfloat16)
            txt = torch.randn(1, text, width, device=device, dtype=torch.bfloat16)
            qk_norm_rope_e4m3_pairs(qkv, weights[0], weights[1], cos, sin, HEADS, 1e-6, txt, weights[2], weights[3])
            joint = torch.randn(1, total, width, device=device, dtype=torch.bfloat16)
            qk_norm_rope_e4m3_pairs(joint, weights[0], weights[1], cos, sin, HEADS, 1e-6)
            print(f"tuned text {text}, image {image}", flush=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
