"""GPU probe: captured CUDA graphs after the transformer's weights got new memory (a round trip through `.to()`,
`load_state_dict(..., assign=True)`, accelerate's `enable_model_cpu_offload()`), on the tiny model in bf16, for three
configs with `compile.cuda_graphs`; each image against the one before the move (and diffusers' own under model offload).

    OUT=results python -m benchmarks.probe_graphs   # writes $OUT/probe-graphs.json

NOTES.md, 2026-12-03 13:40: before engine.cuda_graphs.WeightWatch, diffusers' blocks under the graphs gave NaN images.
tests/test_compile.py::test_captured_graphs_follow_weights_given_new_memory checks the same in CI's GPU tests.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from diffusers import FluxPipeline

from engine import EngineConfig, optimize
from engine.config import AttentionConfig, CompileConfig
from engine.measure import psnr
from engine.models import synthetic_components

GRAPHS = CompileConfig(mode="regional", cuda_graphs=True)
CONFIGS = {
    "fastest": "fp8-compile-fastacc-cudagraphs",
    "graphs-bf16": EngineConfig(compile=GRAPHS),
    "kernels-graphs": EngineConfig(attention=AttentionConfig(backend="auto", fused_norms=True), compile=GRAPHS),
}
MOVES = ("to-roundtrip", "assign", "model-cpu-offload")


def _pipe() -> FluxPipeline:
    pipe = FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    call = dict(height=256, width=256, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32)
    return pipe("a red fox in the snow", generator=generator, output_type="pt", **call).images.float()


def _move(pipe, move: str) -> list:
    """Give the transformer's weights new memory; returns tensors that take the freed memory meanwhile."""
    if move == "to-roundtrip":
        pipe.transformer.to("cpu")
        junk = [torch.randn(1 << 20, device="cuda") for _ in range(64)]
        pipe.transformer.to("cuda")
        return junk
    if move == "assign":
        weights = {name: value.clone() for name, value in pipe.transformer.state_dict().items()}
        pipe.transformer.load_state_dict(weights, assign=True, strict=False)
        return [torch.randn(1 << 20, device="cuda") for _ in range(64)]
    pipe.enable_model_cpu_offload()
    return []


def probe(name: str, config, move: str) -> dict:
    pipe = optimize(_pipe(), config)
    _image(pipe)
    before = _image(pipe)  # captured, and replayed
    junk = _move(pipe, move)
    after = _image(pipe)
    result = {
        "psnr_vs_before": psnr(after, before),
        "finite": bool(after.isfinite().all()),
        "before_finite": bool(before.isfinite().all()),
        "captures": pipe.compile_state.cuda_graphs.captures,
    }
    if move == "model-cpu-offload":
        reference = _pipe()
        reference.enable_model_cpu_offload()
        result["psnr_vs_diffusers_offload"] = psnr(after, _image(reference))
    del junk
    return result


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_graphs needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {}
    for name, config in CONFIGS.items():
        for move in MOVES:
            key = f"{name}/{move}"
            try:
                results[key] = probe(name, config, move)
            except Exception as err:  # a probe: record and go on
                results[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(key, results[key], flush=True)
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "probe-graphs.json"), "w") as out:
        json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
