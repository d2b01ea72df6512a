"""Benchmark: weight quantisation of the synthetic FLUX.1-dev transformer, every mode beside bf16 in one run.

    python -m benchmarks.bench_quant --out benchmarks/results/quant-<gpu>-<date>.json
    python -m benchmarks.bench_quant --load-peak-mode fp8 --out benchmarks/results/quant-load-<gpu>-<date>.json

Per mode (bf16 reference, fp8, fp8-weight, int8-weight, nf4), each on the engine's kernels (the "kernels"
preset's attention) so only the quantisation differs, at 1024^2:
- transformer weight GiB (the bytes the modules hold) and the quantise time;
- ms per transformer step, eager (CUDA events, median/p20/p80 of --reps after 2 warm-ups), TFLOP/s from the
  bench's flop count, peak VRAM (torch allocated / reserved) of those steps;
- per-layer SQNR (dB) on the activations a real forward feeds each Linear (quantised on the fly in a hook,
  the bf16 model unchanged) and on the N(0, 1) probe recorded while quantising;
- fidelity of a --steps denoise with the same seed and prompt embeddings: relative error of the final
  latents and PSNR of the decoded image vs bf16.
Then bf16 vs fp8 under regional compile (presets kernels-compile / fp8-compile, compile cache off: cold
compile time) at 1024^2 and 2048^2; T5 in nf4 (bytes, embedding error); and one Linear at FLUX's MLP shape
(4608x3072 @ 3072x12288): bf16, fp8 `_scaled_mm` (with and without the activation quantisation), NF4.
Random-init weights have no trained outliers: the SQNR and PSNR here are what the arithmetic does to
Gaussian-like weights, not a measurement of a real checkpoint (`--model` is future work). Needs CUDA.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from engine.config import PRESETS, CacheConfig, EngineConfig, QuantConfig
from engine.measure import (
    environment_info,
    psnr,
    quantiles,
    relative_error,
    sqnr_db,
    track_peak_memory,
)
from engine.models import build_transformer, dtype_as_default, synthetic_components, variant_spec

MODES = ("none", "fp8", "fp8-weight", "int8-weight", "nf4")
PROMPT = "a photograph of an astronaut riding a horse on the moon, earth rising behind"
GIB = 2**30
MLP_SHAPE = (4608, 3072, 12288)  # tokens, in, out


def log(*parts) -> None:
    print(*parts, flush=True)


VARIANT = "flux-dev"  # --variant tiny --device cpu: a smoke test of this script on a CPU


def synthetic_transformer(device, seed: int = 0):
    """The transformer exactly as synthetic_components builds it (it is built first from the seed)."""
    spec = variant_spec(VARIANT)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), dtype_as_default(torch.bfloat16):
        torch.manual_seed(seed)
        return build_transformer(spec).eval().requires_grad_(False)


def step_inputs(pipe, embeds, height: int, width: int, device) -> dict:
    prompt_embeds, pooled, text_ids = embeds
    generator = torch.Generator(device).manual_seed(0)
    latents, image_ids = pipe.prepare_latents(1, 16, height, width, torch.bfloat16, device, generator)
    return {
        "hidden_states": latents,
        "encoder_hidden_states": prompt_embeds,
        "pooled_projections": pooled,
        "timestep": torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
        "img_ids": image_ids,
        "txt_ids": text_ids,
        "guidance": torch.full((1,), 3.5, device=device, dtype=torch.float32),
        "return_dict": False,
    }


def time_steps(transformer, inputs: dict, reps: int, device, warmup: int = 2) -> tuple[dict, dict, float]:
    """(ms quantiles, peak memory, first-call seconds) of transformer(**inputs)."""
    from engine.measure import Timer

    times, first_s = [], float("nan")
    with torch.no_grad(), track_peak_memory(device) as peak:
        for index in range(warmup + reps):
            start = time.perf_counter()
            with Timer(device) as timer:
                transformer(**inputs)
            if index == 0:
                first_s = time.perf_counter() - start
            if index >= warmup:
                times.append(timer.ms)
    return quantiles(times), peak.as_dict(), first_s


def denoise_and_decode(pipe, embeds, height: int, width: int, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_embeds, pooled, _ = embeds
    with torch.no_grad():
        latents = pipe(
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=height, width=width,
            num_inference_steps=steps, guidance_scale=3.5, generator=torch.Generator(device).manual_seed(0),
            output_type="latent",
        ).images  # fmt: skip
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = (pipe.vae.decode(unpacked, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
    return latents.float(), image


def make_pipe(shared: dict, transformer):
    from diffusers import FluxPipeline

    return FluxPipeline(**{**shared, "transformer": transformer, "text_encoder": None, "text_encoder_2": None})


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sqnr_summary(values: dict[str, float]) -> dict:
    from engine.quant import sqnr_summary as summary

    return summary(values)


def real_activation_sqnr(shared, embeds, modes, height, width, device, attention) -> dict:
    """Per mode: SQNR of every quantisable Linear of the bf16 transformer on the activations of one forward."""
    from engine.attention import apply_attention
    from engine.quant import measure_layer_sqnr

    transformer = synthetic_transformer(device)
    pipe = make_pipe(shared, transformer)
    apply_attention(pipe, attention)
    inputs = step_inputs(pipe, embeds, height, width, device)
    results = {}
    for mode in modes:
        start = time.perf_counter()
        per_layer = measure_layer_sqnr(transformer, mode, functools.partial(transformer, **inputs))
        results[mode] = sqnr_summary(per_layer)
        log(f"  real-activation SQNR {mode}: {results[mode].get('min_db')} .. {results[mode].get('median_db')} dB "
            f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    del pipe, transformer, inputs
    free(device)
    return results


def flops_per_step(height: int, width: int) -> float | None:
    try:
        from engine.bench.phases import transformer_step_flops

        return float(transformer_step_flops(dict(variant_spec(VARIANT).transformer), height, width, 512))
    except Exception:  # noqa: BLE001 - the bench module is being edited elsewhere; TFLOP/s is optional
        return None


def run_mode(shared, embeds, mode, config, args, device, reference) -> dict:
    from engine.memory.weights import actual_weight_bytes
    from engine.pipeline import optimize
    from engine.quant import quantization_report

    row = {"mode": "bf16" if mode == "none" else mode, "config": config.label, "height": args.res, "width": args.res}
    transformer = synthetic_transformer(device)
    pipe = make_pipe(shared, transformer)
    start = time.perf_counter()
    optimize(pipe, config)
    free(device)
    row["optimize_s"] = round(time.perf_counter() - start, 2)
    row["weight_gib"] = round(actual_weight_bytes(transformer) / GIB, 3)
    inputs = step_inputs(pipe, embeds, args.res, args.res, device)
    ms, peak, first_s = time_steps(transformer, inputs, args.reps, device)
    row.update({"step_ms": ms, "peak": peak, "first_call_s": round(first_s, 2)})
    flops = flops_per_step(args.res, args.res)
    if flops:
        row["tflops"] = round(flops / (ms["median"] * 1e-3) / 1e12, 1)
    report = quantization_report(pipe).get("transformer")
    if report:
        row["probe_sqnr"] = report["sqnr"]
    if config.compile.mode != "none" and args.res2 and time.perf_counter() - args.t0 < args.budget_s:
        inputs2 = step_inputs(pipe, embeds, args.res2, args.res2, device)
        ms2, peak2, first2 = time_steps(transformer, inputs2, max(2, args.reps // 2), device)
        row["res2"] = {"height": args.res2, "step_ms": ms2, "peak": peak2, "first_call_s": round(first2, 2)}
    if config.compile.mode == "none":
        latents, image = denoise_and_decode(pipe, embeds, args.res, args.res, args.steps, device)
        if reference is None:
            reference = {"latents": latents, "image": image}
        row["latent_rel_err"] = relative_error(latents, reference["latents"])
        row["image_psnr_db"] = psnr(image, reference["image"])
    del pipe, transformer, inputs
    free(device)
    return row, reference


def t5_nf4(components, embeds, device) -> dict:
    """T5-XXL in nf4: weight bytes and the prompt embeddings' SQNR vs bf16 (same tokens)."""
    from engine.memory.weights import actual_weight_bytes
    from engine.quant import quantize_model

    t5 = components["text_encoder_2"]
    length = variant_spec(VARIANT).t5_max_length
    tokens = components["tokenizer_2"](PROMPT, padding="max_length", max_length=length, truncation=True,
                                       return_tensors="pt").input_ids.to(device)  # fmt: skip
    with torch.no_grad():
        reference = t5(tokens)[0].float()
    bf16_gib = actual_weight_bytes(t5) / GIB
    quantize_model(t5, "nf4", "text_encoder_2", record_sqnr=False)
    free(device)
    with torch.no_grad():
        quantized = t5(tokens)[0].float()
    return {"bf16_gib": round(bf16_gib, 3), "nf4_gib": round(actual_weight_bytes(t5) / GIB, 3),
            "embeds_sqnr_db": round(sqnr_db(quantized, reference), 2)}  # fmt: skip


def linear_microbench(device) -> list[dict]:
    import triton.testing

    from engine.quant import Fp8Linear
    from engine.quant.layers import _nf4_linear
    from flux_kernels.fp8 import quantize_fp8_rowwise

    tokens, in_features, out_features = MLP_SHAPE
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(linear)
    x_fp8, x_scale = quantize_fp8_rowwise(x)
    w_t, w_scale = fp8.weight_fp8.t(), fp8.weight_scale.view(1, -1)
    cases = {
        "bf16 F.linear": lambda: linear(x),
        f"fp8 Fp8Linear ({fp8.compute}, incl. activation quant)": lambda: fp8(x),
        "fp8 _scaled_mm only (activations pre-quantised)": lambda: torch._scaled_mm(
            x_fp8, w_t, scale_a=x_scale, scale_b=w_scale, bias=fp8.bias, out_dtype=torch.bfloat16
        ),
        "nf4 bitsandbytes Linear4bit": (lambda m: lambda: m(x))(_nf4_linear(linear, double_quant=False)),
    }
    rows, flop = [], 2 * tokens * in_features * out_features
    for name, fn in cases.items():
        with torch.no_grad():
            ms = quantiles(list(triton.testing.do_bench(fn, return_mode="all")))
        rows.append({"case": name, "ms": ms, "tflops": round(flop / (ms["median"] * 1e-3) / 1e12, 1)})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'mode':<12} {'config':<34} {'GiB':>7} {'ms/step':>9} {'TFLOP/s':>8} {'peak GiB':>9} " \
           f"{'SQNR min/med':>13} {'lat err':>8} {'PSNR':>6}"  # fmt: skip
    lines = [head]
    for row in rows:
        sqnr = row.get("real_sqnr") or row.get("probe_sqnr") or {}
        sq = f"{sqnr.get('min_db', float('nan')):.1f}/{sqnr.get('median_db', float('nan')):.1f}" if sqnr else "-"
        psnr_value = row.get("image_psnr_db")
        lines.append(
            f"{row['mode']:<12} {row['config'][:34]:<34} {row['weight_gib']:>7.2f} {row['step_ms']['median']:>9.1f} "
            f"{row.get('tflops', float('nan')):>8.1f} {row['peak']['allocated_gib'] or float('nan'):>9.2f} {sq:>13} "
            f"{row.get('latent_rel_err', float('nan')):>8.4f} "
            f"{(psnr_value if psnr_value is not None else float('nan')):>6.1f}"
        )
        if "res2" in row:
            lines.append(f"{'':<12} {'  at ' + str(row['res2']['height']) + '^2':<34} {'':>7} "
                         f"{row['res2']['step_ms']['median']:>9.1f}")  # fmt: skip
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=1))


def load_peak(args, device) -> dict:
    """Device peak while loading a saved synthetic pipeline with the transformer quantised (`--load-peak-mode`):
    quantised while loading (load_local_components(quant=...)) vs loaded whole and then quantised (the old
    order). The folder (synthetic `--variant`, bf16) is written to `--load-peak-dir` (default: a temporary folder,
    removed after), ~32 GB for flux-dev."""
    import shutil
    import tempfile

    from diffusers import FluxPipeline

    from engine.memory.weights import actual_weight_bytes
    from engine.models import load_local_components
    from engine.quant import apply_quantization

    quant = QuantConfig(transformer=args.load_peak_mode)
    folder = Path(args.load_peak_dir or tempfile.mkdtemp(prefix="bench-quant-load-")) / "model"
    result = {"mode": args.load_peak_mode, "variant": VARIANT, "folder": str(folder)}
    try:
        start = time.perf_counter()
        FluxPipeline(**synthetic_components(VARIANT, device=device, dtype=torch.bfloat16, seed=0)).save_pretrained(
            folder
        )
        free(device)
        result["save_s"] = round(time.perf_counter() - start, 1)
        log(f"saved {folder} in {result['save_s']} s")
        for label in ("quantised while loading", "loaded, then quantised"):
            start = time.perf_counter()
            with track_peak_memory(device) as peak:
                if label.startswith("quantised while"):
                    components = load_local_components(folder, device, torch.bfloat16, quant=quant)
                else:
                    components = load_local_components(folder, device, torch.bfloat16)
                    apply_quantization(FluxPipeline(**components), quant)
            row = {"load_s": round(time.perf_counter() - start, 1), "peak": peak.as_dict()}
            parts = ("transformer", "text_encoder", "text_encoder_2", "vae")
            row["transformer_gib"] = round(actual_weight_bytes(components["transformer"]) / GIB, 3)
            row["all_components_gib"] = round(sum(actual_weight_bytes(components[n]) for n in parts) / GIB, 3)
            result[label] = row
            allocated = row["peak"]["allocated_gib"]
            allocated = "-" if allocated is None else round(allocated, 2)
            log(f"  {label}: peak allocated {allocated} GiB, components {row['all_components_gib']} GiB "
                f"(transformer {row['transformer_gib']}), {row['load_s']} s")  # fmt: skip
            del components
            free(device)
    finally:
        if args.load_peak_dir is None:
            shutil.rmtree(folder.parent, ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--res2", type=int, default=2048, help="second size for the compiled pair (0: skip)")
    parser.add_argument("--steps", type=int, default=4, help="denoise steps of the fidelity run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--variant", default="flux-dev")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script (--variant tiny)")
    parser.add_argument("--budget-s", type=float, default=230.0, help="skip optional parts past this many seconds")
    parser.add_argument("--load-peak-mode", default=None, choices=MODES[1:],
                        help="only measure the device peak of loading a saved pipeline with the transformer in this "
                             "mode: quantised while loading vs loaded whole, then quantised")  # fmt: skip
    parser.add_argument("--load-peak-dir", default=None, help="where --load-peak-mode writes the pipeline")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_quant needs a CUDA GPU", file=sys.stderr)
        return 2
    global VARIANT
    VARIANT = args.variant
    args.t0 = time.perf_counter()
    payload = {"env": environment_info(device), "args": {k: v for k, v in vars(args).items() if k != "t0"},
               "rows": []}  # fmt: skip
    payload["args"]["out"] = str(args.out)
    if args.load_peak_mode:
        payload["load_peak"] = load_peak(args, device)
        payload["elapsed_s"] = round(time.perf_counter() - args.t0, 1)
        write(args.out, payload)
        return 0
    log("building synthetic flux-dev and encoding the prompt ...")
    components = synthetic_components(VARIANT, device=device, dtype=torch.bfloat16, seed=0)
    pipe = make_pipe({k: v for k, v in components.items() if k != "transformer"}, None)
    pipe.text_encoder, pipe.text_encoder_2 = components["text_encoder"], components["text_encoder_2"]
    with torch.no_grad():
        embeds = pipe.encode_prompt(
            PROMPT, None, device=device, max_sequence_length=variant_spec(VARIANT).t5_max_length
        )
    del pipe, components["transformer"]
    free(device)
    if device.type == "cuda":
        payload["t5_nf4"] = t5_nf4(components, embeds, device)
        log(f"T5 nf4: {payload['t5_nf4']}")
    shared = {k: v for k, v in components.items() if k not in ("transformer", "text_encoder", "text_encoder_2")}
    del components
    free(device)

    modes = [m for m in args.modes.split(",") if m and (device.type == "cuda" or m != "nf4")]
    kernels = PRESETS["kernels"].attention
    if device.type != "cuda":
        kernels = replace(kernels, fused_norms=False)  # fused QKV without Triton
    if device.type == "cuda":
        payload["linear"] = linear_microbench(device)
        for item in payload["linear"]:
            log(f"  {item['case']:<58} {item['ms']['median']:8.3f} ms {item['tflops']:7.1f} TFLOP/s")
    reference = None
    for mode in modes:
        config = EngineConfig(attention=kernels, quant=QuantConfig(transformer=mode))
        log(f"mode {mode} ...")
        row, reference = run_mode(shared, embeds, mode, config, args, device, reference)
        payload["rows"].append(row)
        write(args.out, payload)
        log(format_table([row]).splitlines()[1])
    if not args.no_compile and device.type == "cuda":
        for name in ("kernels-compile", "fp8-compile"):
            if time.perf_counter() - args.t0 > args.budget_s:
                log(f"skipping {name}: past the time budget")
                continue
            config = replace(PRESETS[name], cache=CacheConfig(enabled=False))
            log(f"compiled {name} ...")
            row, _ = run_mode(shared, embeds, config.quant.transformer, config, args, device, reference)
            payload["rows"].append(row)
            write(args.out, payload)
            log(f"  first call (compile) {row['first_call_s']} s, {row['step_ms']['median']:.1f} ms/step")
    if time.perf_counter() - args.t0 < args.budget_s + 30:
        quant_modes = [m for m in modes if m != "none"]
        real = real_activation_sqnr(shared, embeds, quant_modes, args.res, args.res, device, kernels)
        for row in payload["rows"]:
            if row["config"].find("compile") < 0 and row["mode"] in real:
                row["real_sqnr"] = real[row["mode"]]
    payload["elapsed_s"] = round(time.perf_counter() - args.t0, 1)
    write(args.out, payload)
    log(format_table(payload["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
