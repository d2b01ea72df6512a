"""GPU probe: a pipeline built over one that optimize() gave an offload policy (diffusers' `from_pipe`, never
optimised itself; then `optimize()` of it with the same config; `FluxEngine.from_pipe`), on the tiny model in bf16:
its image against the optimised pipeline's, or the error it raises. On a CPU every component lives in one memory, so
nothing shows there (a helper's reading of engine/offload/policies.py, 2026-12-03: the wrapped encode_prompt that
brings the text encoders to the GPU is the first pipeline's only).

    OUT=results python -m benchmarks.probe_from_pipe   # writes $OUT/probe-from-pipe.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline

from engine import EngineConfig, FluxEngine, optimize
from engine.config import OffloadConfig
from engine.measure import psnr
from engine.models import synthetic_components

CALL = dict(height=256, width=256, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32)


def _image(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt", **CALL).images.float()


def probe(policy: str, route: str) -> dict:
    config = EngineConfig(offload=OffloadConfig(policy))
    pipe = optimize(FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0)), config)
    expected = _image(pipe)
    bf16 = {"torch_dtype": torch.bfloat16}  # without it, diffusers' from_pipe makes every shared component float32
    if route == "from_pipe":
        other = FluxPipeline.from_pipe(pipe, **bf16)
    elif route == "from_pipe+optimize":
        other = optimize(FluxPipeline.from_pipe(pipe, **bf16), config)
    elif route == "img2img.from_pipe":  # strength 1: the text-to-image's noise, so the same image
        other = FluxImg2ImgPipeline.from_pipe(pipe, **bf16)
        other.set_progress_bar_config(disable=True)
        image = torch.zeros(1, 3, 256, 256)
        got = other("a red fox", image=image, strength=1.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **CALL).images.float()  # fmt: skip
        return {"psnr_vs_optimised": psnr(got, expected)}
    else:
        other = FluxEngine.from_pipe(pipe, config)
    return {"psnr_vs_optimised": psnr(_image(other), expected), "again": psnr(_image(pipe), expected)}


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_from_pipe needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {}
    for policy in ("model", "block", "leaf"):
        for route in ("from_pipe", "from_pipe+optimize", "img2img.from_pipe", "FluxEngine.from_pipe"):
            key = f"{policy}/{route}"
            try:
                results[key] = probe(policy, route)
            except Exception as err:  # a probe: record and go on
                results[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(key, results[key], flush=True)
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "probe-from-pipe.json"), "w") as out:
        json.dump({k: {a: str(b) if isinstance(b, float) and b == float("inf") else b for a, b in v.items()}
                   for k, v in results.items()}, out, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
