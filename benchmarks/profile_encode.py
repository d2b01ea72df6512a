"""Where a FLUX pipeline's prompt encoding goes (CLIP + T5-XXL, `pipe.encode_prompt`): its wall time (CUDA events),
the GPU time of its kernels (largest first), so how much of the call the GPU is busy, and the dtype of each kind of
T5 weight (transformers keeps T5's `wo` in fp32 when `_keep_in_fp32_modules` applies).

    python -m benchmarks.profile_encode --out benchmarks/results/profile-encode-<gpu>-<date>.json

The synthetic flux-dev text encoders (random weights: speed does not depend on the values), bf16, 512 T5 tokens as
FLUX.1-dev uses; CUDA only (exits 2 without it).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.profiling import call_kernels
from engine.measure import environment_info, event_ms

TOP = 20
PROMPT = "a photograph of an astronaut riding a horse on the moon, earth rising behind"


def weight_dtypes(encoder: torch.nn.Module) -> dict[str, list[str]]:
    """Each kind of parameter (its name without the block index) and the dtypes it has."""
    kinds: dict[str, set] = defaultdict(set)
    for name, parameter in encoder.named_parameters():
        kind = ".".join(part for part in name.split(".") if not part.isdigit())
        kinds[kind].add(str(parameter.dtype).replace("torch.", ""))
    return {kind: sorted(dtypes) for kind, dtypes in sorted(kinds.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_encode: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 2
    from diffusers import FluxPipeline

    from engine.bench.report import write_json
    from engine.models import synthetic_components

    components = synthetic_components("flux-dev", device="cuda", dtype=torch.bfloat16, seed=0)
    pipe = FluxPipeline(**components)

    def encode():
        with torch.no_grad():
            return pipe.encode_prompt(PROMPT, None, max_sequence_length=args.max_sequence_length)

    ms = event_ms(encode)
    found = [(round(ms, 3), count, name) for ms, count, name in call_kernels(encode)]
    kernel_ms = sum(row[0] for row in found)
    result = {
        "env": environment_info(torch.device("cuda")),
        "max_sequence_length": args.max_sequence_length,
        "encode_ms": ms,
        "kernel_ms": kernel_ms,
        "gpu_busy": kernel_ms / ms,
        "t5_dtypes": weight_dtypes(pipe.text_encoder_2),
        "top": found[:TOP],
    }
    print(f"encode_prompt: {ms:.1f} ms, kernels {kernel_ms:.1f} ms ({kernel_ms / ms:.0%} busy)")
    for kind, dtypes in result["t5_dtypes"].items():
        print(f"  T5 {kind}: {', '.join(dtypes)}")
    for kernel_ms, count, name in found[:TOP]:
        print(f"  {kernel_ms:8.2f} ms {count:4d}x {name[:100]}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
