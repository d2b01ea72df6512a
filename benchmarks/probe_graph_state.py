"""GPU probe (audit of state captured CUDA graphs bake in): per case, a change a user can make between pipeline calls
through diffusers' / PEFT's / torch's public APIs, made after the graphs were captured, and the next image against
one that sees the change (the same pipeline after engine.cuda_graphs.drop_captured_graphs, i.e. captured again
under the new state; for the scale cases the image before the change, which the change must not alter; for the
configs on diffusers' own blocks also diffusers' own pipeline given the same change). Tiny model, bf16, 256^2, 2 steps.

    OUT=results python -m benchmarks.probe_graph_state     # writes $OUT/probe-graph-state.json
    PROBE_DEVICE=cpu python -m benchmarks.probe_graph_state  # plumbing only (no graphs on a CPU)

Configs: F = fp8-compile-fastacc-cudagraphs (fused blocks, compiled, whole-forward graph; LoRA scales are tensors),
FB = the same with First-Block Cache (threshold 0: every step full, the tail graph replays), G = diffusers' own
blocks uncompiled under the whole-forward graph (EngineConfig(compile=CompileConfig('none', cuda_graphs=True))).
Verdict per case: 'follows' (the image after the change is the one that sees it), 'STALE' (it is the image before
the change, or nearer to it than to the reference), 'DIFFERS' (neither), 'error: ...'.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch
from diffusers import FluxPipeline

from engine import EngineConfig, optimize
from engine.config import CompileConfig, preset
from engine.cuda_graphs import drop_captured_graphs
from engine.lora import is_lora_layer, synthetic_lora
from engine.measure import psnr
from engine.models import synthetic_components
from engine.stepcache import StepCacheConfig, with_step_cache

CPU = os.environ.get("PROBE_DEVICE") == "cpu"
DEVICE = "cpu" if CPU else "cuda"
DTYPE = torch.float32 if CPU else torch.bfloat16
BUDGET_S = float(os.environ.get("PROBE_BUDGET_S", 230))  # cases left when this has passed are skipped
FASTEST = preset("fp8-compile-fastacc-cudagraphs")
CONFIGS = {
    "F": FASTEST,
    "FB": with_step_cache(FASTEST, StepCacheConfig("fbcache", threshold=0.0)),
    "G": EngineConfig(compile=CompileConfig(mode="none", cuda_graphs=True)),
}
if CPU:  # no graphs, no fp8 on a CPU: the cases' plumbing only
    CONFIGS = dict.fromkeys(CONFIGS, "baseline")
CALL = dict(height=256, width=256, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32)
_LORAS: dict = {}


def _pipe() -> FluxPipeline:
    pipe = FluxPipeline(**synthetic_components("tiny", device=DEVICE, dtype=DTYPE, seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(name: str) -> dict:
    """A rank-4 adapter on every projection, from an unoptimised transformer (the fp8 one has no bf16 weights)."""
    if not _LORAS:
        plain = _pipe().transformer
        _LORAS.update(a=synthetic_lora(plain, 4, seed=1, strength=1.0),
                      b=synthetic_lora(plain, 4, seed=2, strength=1.0))
    return dict(_LORAS[name])


def _image(pipe, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red fox in the snow", generator=generator, output_type="pt", **CALL, **kwargs).images.float()


def _captures(pipe) -> int:
    whole = getattr(getattr(pipe, "compile_state", None), "cuda_graphs", None)
    tail = getattr(getattr(pipe, "step_cache_state", None), "tail_graphs", None)
    return sum(g.captures for g in (whole, tail) if g is not None)


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def _verdict(after, before, reference, tol: float = 1e-3) -> str:
    if not bool(after.isfinite().all()):
        return "STALE (non-finite image)"
    if _maxdiff(after, reference) <= tol:
        return "follows"
    if _maxdiff(after, before) <= tol or psnr(after, before) > psnr(after, reference):
        return "STALE"
    return "DIFFERS"


def _load(*names):
    def setup(pipe):
        for name in names:
            pipe.load_lora_weights(_lora(name), adapter_name=name)

    return setup


# ----------------------------------------------------------------------------- the cases' shapes


def changed_state(config: str, setup, change, warm: int = 2, diffusers_too: bool = False) -> dict:
    """`change(pipe)` after the graphs were captured (it may return a context manager the later calls run in); the
    image after it against the same pipeline captured again under the change (drop_captured_graphs), and for the
    configs on diffusers' own blocks (`diffusers_too`) against diffusers' pipeline given the same setup and change."""
    pipe = optimize(_pipe(), CONFIGS[config])
    setup(pipe)
    for _ in range(warm):  # the first call warms up (and captures at its second step), the next replays
        before = _image(pipe)
    captured = _captures(pipe)
    context = change(pipe) or contextlib.nullcontext()
    with context if hasattr(context, "__enter__") else contextlib.nullcontext():
        after = _image(pipe)
        replayed = _captures(pipe) == captured  # no capture since: the call replayed the graphs captured before
        drop_captured_graphs(pipe)
        _image(pipe)  # warm-up and capture under the change
        reference = _image(pipe)  # a replay of that capture
        result = {"captures_before_change": captured, "after_replayed_old_graph": replayed,
                  "captures": _captures(pipe)}  # fmt: skip
        if diffusers_too:
            plain = _pipe()
            setup(plain)
            for _ in range(warm):
                plain_before = _image(plain)
            plain_context = change(plain) or contextlib.nullcontext()
            with plain_context if hasattr(plain_context, "__enter__") else contextlib.nullcontext():
                plain_after = _image(plain)
            result.update(psnr_before_vs_diffusers=psnr(before, plain_before),
                          psnr_after_vs_diffusers=psnr(after, plain_after),
                          psnr_recaptured_vs_diffusers=psnr(reference, plain_after))  # fmt: skip
    result.update(
        psnr_after_vs_recaptured=psnr(after, reference), maxdiff_after_vs_recaptured=_maxdiff(after, reference),
        psnr_after_vs_before=psnr(after, before), psnr_recaptured_vs_before=psnr(reference, before),
        verdict=_verdict(after, before, reference),
    )  # fmt: skip
    return result


def restored_state(config: str, setup, change, warm: int = 2) -> dict:
    """`change(pipe)` must leave the state as it was (a call with joint_attention_kwargs={'scale': s}): the next plain
    call against the one before it, and against a freshly optimised pipeline given the same setup."""
    pipe = optimize(_pipe(), CONFIGS[config])
    setup(pipe)
    for _ in range(warm):
        before = _image(pipe)
    captured = _captures(pipe)
    change(pipe)
    after = _image(pipe)
    result = {"captures_before_change": captured, "after_replayed_old_graph": _captures(pipe) == captured}
    layer = next((m for m in pipe.transformer.modules() if is_lora_layer(m)), None)
    if layer is not None:  # the scale the graph reads (the kept tensor) against the one PEFT's dict holds now
        kept = layer.__dict__.get("_engine_scaling_tensors", {}).get("a")
        now = layer.scaling.get("a")
        result["scale_in_dict"] = float(now)
        result["scale_graph_reads"] = None if kept is None else float(kept)
        result["dict_holds_kept_tensor"] = kept is not None and now is kept
    fresh = optimize(_pipe(), CONFIGS[config])
    setup(fresh)
    for _ in range(warm):
        fresh_image = _image(fresh)
    result.update(
        psnr_after_vs_before=psnr(after, before), maxdiff_after_vs_before=_maxdiff(after, before),
        psnr_after_vs_fresh=psnr(after, fresh_image), psnr_before_vs_fresh=psnr(before, fresh_image),
        verdict="follows" if _maxdiff(after, before) <= 1e-3 else "STALE (the scale of the scaled call stayed)",
    )  # fmt: skip
    return result


def layerwise_casting(config: str) -> dict:
    """diffusers' apply_layerwise_casting called directly (enable_layerwise_casting is refused under graphs): its hooks
    give the weights new memory every forward; three calls after it (warm-up, capture, replay) against diffusers'."""
    from diffusers.hooks import apply_layerwise_casting

    pipe = optimize(_pipe(), CONFIGS[config])
    plain = _pipe()
    for _ in range(2):
        _image(pipe)
    for target in (pipe, plain):
        apply_layerwise_casting(target.transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=DTYPE)
    images = [_image(pipe) for _ in range(3)]
    expected = _image(plain)
    return {
        "psnr_vs_diffusers_per_call": [psnr(image, expected) for image in images],
        "finite_per_call": [bool(image.isfinite().all()) for image in images],
        "captures": _captures(pipe),
        "verdict": "follows" if all(psnr(i, expected) > 40 for i in images) else "STALE or DIFFERS",
    }


# ----------------------------------------------------------------------------- the changes


def _scaled_call(scale: float):
    def change(pipe):
        _image(pipe, joint_attention_kwargs={"scale": scale})  # runs as launched (no graph), then PEFT unscales

    return change


def _set_adapters_then_scale0(pipe):
    pipe.set_adapters(["a"], [0.6])


def _hook_on_first_block(pipe):
    pipe.transformer.transformer_blocks[0].register_forward_hook(lambda module, args, out: (out[0], out[1] * 0.0))


def _half_processor(pipe):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class HalfProcessor(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):  # fmt: skip
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            return tuple(o * 0.0 for o in out) if isinstance(out, tuple) else out * 0.0

    pipe.transformer.set_attn_processor(HalfProcessor())


def _autocast_fp16(pipe):
    return torch.autocast(DEVICE, dtype=torch.float16)


def _sdpa_math(pipe):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


CASES = {
    # LoRA scale of a call (diffusers' apply_lora_scale: PEFT's scale_layer multiplies the scale tensor in place,
    # unscale_layer puts a new tensor in the dict; the graph keeps reading the multiplied one)
    "jak-scale-0.5-then-plain/F": lambda: restored_state("F", _load("a"), _scaled_call(0.5)),
    "jak-scale-0.5-then-plain/FB": lambda: restored_state("FB", _load("a"), _scaled_call(0.5), warm=3),
    # PeftAdapterMixin methods the engine does not wrap
    "transformer.disable_adapters/F": lambda: changed_state("F", _load("a"),
                                                            lambda p: p.transformer.disable_adapters()),
    "transformer.disable_adapters/FB": lambda: changed_state("FB", _load("a"),
                                                             lambda p: p.transformer.disable_adapters(), warm=3),
    "transformer.set_adapter/F": lambda: changed_state(
        "F", lambda p: (_load("a", "b")(p), p.set_adapters("a")), lambda p: p.transformer.set_adapter("b")),
    # a torch hook on a module inside the graph, registered after the capture
    "forward-hook-on-block/F": lambda: changed_state("F", lambda p: None, _hook_on_first_block),
    "forward-hook-on-block/G": lambda: changed_state("G", lambda p: None, _hook_on_first_block, diffusers_too=True),
    # attention processor on diffusers' own blocks (not refused where the blocks are not the engine's)
    "set_attn_processor/G": lambda: changed_state("G", lambda p: None, _half_processor, diffusers_too=True),
    # float LoRA scales (uncompiled graphs): a scale-0 call resets them to lora_alpha / r (diffusers' unscale), the
    # graph keeps the set_adapters weight it was captured with
    "jak-scale-0-after-set_adapters/G": lambda: changed_state(
        "G", lambda p: (_load("a")(p), _set_adapters_then_scale0(p)), _scaled_call(0.0), diffusers_too=True),
    # torch's global state around the call
    "autocast-fp16/G": lambda: changed_state("G", lambda p: None, _autocast_fp16, diffusers_too=True),
    "sdpa_kernel-math/G": lambda: changed_state("G", lambda p: None, _sdpa_math, diffusers_too=True),
    "apply_layerwise_casting/G": lambda: layerwise_casting("G"),
    # controls (wrapped by the engine: should read 'follows')
    "control:set_adapters-weight/F": lambda: changed_state("F", _load("a"), lambda p: p.set_adapters(["a"], [0.3])),
    "control:pipe.disable_lora/F": lambda: changed_state("F", _load("a"), lambda p: p.disable_lora()),
}


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def main() -> int:
    if not CPU and not torch.cuda.is_available():
        print("probe_graph_state needs a CUDA GPU (PROBE_DEVICE=cpu runs the plumbing only)", file=sys.stderr)
        return 2
    start, results = time.perf_counter(), {}
    only = [name for name in os.environ.get("PROBE_CASES", "").split(",") if name]
    for name, case in CASES.items():
        if only and name not in only:
            continue
        if time.perf_counter() - start > BUDGET_S:
            results[name] = {"verdict": "skipped (time budget)"}
        else:
            case_start = time.perf_counter()
            try:
                results[name] = case()
            except Exception as err:  # a probe: record and go on
                results[name] = {"verdict": f"error: {type(err).__name__}: {str(err)[:300]}"}
            results[name]["seconds"] = round(time.perf_counter() - case_start, 1)
        short = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in results[name].items()}
        print(f"{name}: {short}", flush=True)
        if not CPU:
            torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "probe-graph-state.json"), "w") as out:
        json.dump(_clean(results), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
