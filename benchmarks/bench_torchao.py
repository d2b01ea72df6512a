"""Benchmark: our fp8 (engine.quant, `torch._scaled_mm` row-wise) vs torchao's
`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` on the synthetic FLUX.1-dev transformer.

    python -m benchmarks.bench_torchao                              # one H100: ~3 minutes
    python -m benchmarks.bench_torchao --variant tiny --device cpu  # smoke test of the script on a CPU

One transformer forward at 1024^2 (4096 image tokens + 512 text tokens, random inputs of the real shapes), in
diffusers' own block layout for all three so that only the linears differ:
- bf16: the reference;
- ours: engine.quant's fp8 W8A8 (per-channel e4m3 weights, per-token dynamic activations, `_scaled_mm`);
- torchao: `quantize_` with Float8DynamicActivationFloat8WeightConfig(PerRow) on exactly the Linears ours
  quantises (a filter_fn keeps the embedders, final norm and output projection in bf16, as ours does).
Each eager and under the engine's regional compile (engine.compile.apply_compile: every block
`.compile(fullgraph=True, dynamic=True)`, inductor, no persistent cache, a fresh inductor/Triton cache directory
per run, so the compile is cold). Per row: ms/forward (CUDA events after warm-up; median, p20, p80), TFLOP/s,
compile seconds (first compiled call minus a warm one), quantise seconds, transformer weight GiB (the bytes the
modules hold) and output SQNR vs the bf16 eager output.

torchao runs with `set_inductor_config=False` (its default, True, sets global inductor flags such as
coordinate-descent tuning for the rest of the process, which would also change the other rows' compiles) and its
default mm_config (fast accumulation on: fp8 products accumulated at lower precision; ours accumulates in fp32).
If torchao cannot be imported, or fails to quantise, run or compile, the error is recorded in the JSON and the
rest runs; the script exits 0. JSON (`--out`, a folder or a file): torchao-<gpu>-<YYYYMMDD-HHMM>.json with the
environment and commit; the table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from engine.measure import Timer, environment_info, quantiles, sqnr_db
from engine.models import build_transformer, dtype_as_default, variant_spec

GIB = 2**30


def log(*parts) -> None:
    print(*parts, flush=True)


# ----------------------------------------------------------------------------- model and inputs


def synthetic_transformer(variant: str, device: torch.device, seed: int = 0):
    """The synthetic transformer, bf16, random-init on `device` (as engine.models builds it)."""
    spec = variant_spec(variant)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), dtype_as_default(torch.bfloat16):
        torch.manual_seed(seed)
        return build_transformer(spec).eval().requires_grad_(False)


def latent_grid(image_tokens: int) -> tuple[int, int]:
    """(rows, cols) of 2x2 latent patches: the squarest grid of `image_tokens` (64x64 for 4096, i.e. 1024^2)."""
    rows = int(math.isqrt(image_tokens))
    while image_tokens % rows:
        rows -= 1
    return rows, image_tokens // rows


def make_inputs(config: dict, image_tokens: int, text_tokens: int, device: torch.device, seed: int = 0) -> dict:
    from diffusers import FluxPipeline

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=torch.bfloat16)

    rows, cols = latent_grid(image_tokens)
    inputs = {
        "hidden_states": randn(1, image_tokens, config["in_channels"]),  # packed latents [B, L_img, 64]
        "encoder_hidden_states": randn(1, text_tokens, config["joint_attention_dim"]),  # T5 [B, L_txt, 4096]
        "pooled_projections": randn(1, config["pooled_projection_dim"]),  # CLIP pooled [B, 768]
        "timestep": torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, rows, cols, device, torch.bfloat16),  # [L_img, 3]
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=torch.bfloat16),
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=torch.float32)
    return inputs


def step_flops(config: dict, image_tokens: int, text_tokens: int) -> float | None:
    rows, cols = latent_grid(image_tokens)
    try:
        from engine.bench.phases import transformer_step_flops

        return float(transformer_step_flops(config, rows * 16, cols * 16, text_tokens))
    except Exception:  # noqa: BLE001 - TFLOP/s is optional; the bench module is edited elsewhere
        return None


# ----------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def time_forward(model, inputs: dict, device: torch.device, warmup: int, reps: int) -> dict:
    """ms quantiles of one forward after `warmup` untimed calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        forward(model, inputs)
    times = []
    for _ in range(reps):
        with Timer(device) as timer:
            forward(model, inputs)
        times.append(timer.ms)
    return quantiles(times)


def first_call_s(model, inputs: dict, device: torch.device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    start = time.perf_counter()
    out = forward(model, inputs)
    synchronize(device)
    return time.perf_counter() - start, out


def weight_gib(model) -> float:
    from engine.memory.weights import actual_weight_bytes

    return round(actual_weight_bytes(model) / GIB, 3)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def compile_regionally(model, backend: str) -> None:
    """The engine's regional compile (engine/compile.py): each block and the modules around them,
    fullgraph=True, dynamic=True; no persistent cache."""
    from engine.compile import apply_compile
    from engine.config import CacheConfig, CompileConfig, EngineConfig

    config = EngineConfig(compile=CompileConfig(mode="regional", backend=backend), cache=CacheConfig(enabled=False))
    apply_compile(SimpleNamespace(transformer=model), config)


def error_text(err: BaseException) -> str:
    tail = traceback.format_exception(type(err), err, err.__traceback__)[-3:]
    return f"{type(err).__name__}: {err}\n" + "".join(tail)[-1500:]


# ----------------------------------------------------------------------------- the three variants


def quantize_ours(model) -> None:
    from engine.quant import quantize_model

    quantize_model(model, "fp8", "transformer", record_sqnr=False)


def torchao_config():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def quantize_torchao(model) -> None:
    from torchao.quantization import quantize_

    from engine.quant import quantizable_linears

    names = {name for name, _ in quantizable_linears(model, "transformer")}
    quantize_(model, torchao_config(), filter_fn=lambda module, fqn: fqn in names)


def run_eager(name: str, model, quantize, args, inputs: dict, reference: torch.Tensor | None, flops) -> dict:
    """Quantise `model` in place (quantize=None: bf16) and time it eager. Without a reference (the bf16 row) the
    row keeps its output under 'output', the reference of the others."""
    device = args.device
    row: dict = {"variant": name}
    try:
        if quantize is not None:
            synchronize(device)
            start = time.perf_counter()
            quantize(model)
            synchronize(device)
            row["quantize_s"] = round(time.perf_counter() - start, 2)
            free(device)
        row["weight_gib"] = weight_gib(model)
        first_s, out = first_call_s(model, inputs, device)
        eager = {"first_call_s": round(first_s, 2), "ms": time_forward(model, inputs, device, args.warmup, args.reps)}
        eager["sqnr_db"] = None if reference is None else round(sqnr_db(out.float(), reference.float()), 2)
        if flops:
            eager["tflops"] = round(flops / (eager["ms"]["median"] * 1e-3) / 1e12, 1)
        row["eager"] = eager
        log(f"  {name} eager: {eager['ms']['median']:.2f} ms/forward, {row['weight_gib']} GiB")
        if reference is None:
            row["output"] = out
    except Exception as err:  # noqa: BLE001 - one variant failing must not lose the others' numbers
        row["error"] = error_text(err)
        log(f"  {name} failed: {type(err).__name__}: {err}")
    return row


def run_compiled(row: dict, model, args, inputs: dict, reference: torch.Tensor, flops) -> None:
    """Compile `model` in place (regional, as the engine does) and add the compiled timings to `row`."""
    if args.no_compile or "error" in row:
        return
    if time.perf_counter() - args.t0 > args.budget_s:
        row["compiled"] = {"skipped": f"past the --budget-s {args.budget_s} s time budget"}
        log(f"  {row['variant']} compiled: skipped (past the time budget)")
        return
    device = args.device
    try:
        torch._dynamo.reset()
        compile_regionally(model, args.compile_backend)
        first_s, out = first_call_s(model, inputs, device)
        ms = time_forward(model, inputs, device, max(1, args.warmup - 1), args.reps)
        compiled = {"backend": args.compile_backend, "first_call_s": round(first_s, 2), "ms": ms}
        compiled["compile_s"] = round(first_s - ms["median"] / 1e3, 2)
        compiled["sqnr_db"] = round(sqnr_db(out.float(), reference.float()), 2)
        if flops:
            compiled["tflops"] = round(flops / (ms["median"] * 1e-3) / 1e12, 1)
        row["compiled"] = compiled
        log(f"  {row['variant']} compiled: {ms['median']:.2f} ms/forward, compile {compiled['compile_s']} s")
    except Exception as err:  # noqa: BLE001
        row["compiled"] = {"error": error_text(err)}
        log(f"  {row['variant']} compiled failed: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- output


def default_out_path(out: Path, env: dict) -> Path:
    if out.suffix == ".json":
        return out
    card = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    card = "".join(c for c in card if c.isalnum() or c in "-_.")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
    return out / f"torchao-{card}-{stamp}.json"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=1) + "\n")


def _cell(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'variant':<10} {'GiB':>7} {'quant s':>8} {'eager ms':>9} {'TFLOP/s':>8} {'SQNR dB':>8} "
        f"{'compiled ms':>12} {'TFLOP/s':>8} {'compile s':>10} {'SQNR dB':>8}  note"
    )
    lines = [head]
    for row in rows:
        eager, compiled = row.get("eager", {}), row.get("compiled", {})
        note = (row.get("error") or compiled.get("error") or compiled.get("skipped") or "").split("\n")[0][:60]
        lines.append(
            f"{row['variant']:<10} {_cell(row.get('weight_gib'), '.2f'):>7} {_cell(row.get('quantize_s'), '.1f'):>8} "
            f"{_cell(eager.get('ms', {}).get('median'), '.2f'):>9} {_cell(eager.get('tflops'), '.0f'):>8} "
            f"{_cell(eager.get('sqnr_db'), '.1f'):>8} {_cell(compiled.get('ms', {}).get('median'), '.2f'):>12} "
            f"{_cell(compiled.get('tflops'), '.0f'):>8} {_cell(compiled.get('compile_s'), '.1f'):>10} "
            f"{_cell(compiled.get('sqnr_db'), '.1f'):>8}  {note}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def torchao_status() -> dict:
    try:
        import torchao

        torchao_config()  # the import paths and the config this script uses exist
    except Exception as err:  # noqa: BLE001 - torchao missing or broken is a result, not a crash
        return {"available": False, "error": error_text(err)}
    return {"available": True, "version": getattr(torchao, "__version__", None), "config": repr(torchao_config())}


def fresh_compiler_caches(root: str | None) -> str:
    """Inductor's and Triton's on-disk caches in a new folder: the compile times are cold."""
    root = root or tempfile.mkdtemp(prefix="bench-torchao-cache-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(root) / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(Path(root) / "triton")
    return root


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="a folder or a .json path")
    parser.add_argument("--variant", default="flux-dev", help="flux-dev, flux-schnell, or tiny (smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test with --variant tiny")
    parser.add_argument("--image-tokens", type=int, default=None, help="default 4096 (1024x1024); 256 on a CPU")
    parser.add_argument("--text-tokens", type=int, default=None, help="default 512; 32 on a CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, eager on a CPU")
    parser.add_argument("--cache-dir", default=None, help="compiler caches here (default: a new empty folder)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="skip compiles started past this many seconds")
    parser.add_argument("--variants", default="bf16,ours,torchao")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    on_cuda = args.device.type == "cuda"
    args.compile_backend = args.compile_backend or ("inductor" if on_cuda else "eager")
    args.image_tokens = args.image_tokens or (4096 if on_cuda else 256)
    args.text_tokens = args.text_tokens or (512 if on_cuda else 32)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - {"bf16", "ours", "torchao"})
    if unknown or "bf16" not in variants:
        parser.error(f"--variants {args.variants!r}: choose from bf16, ours, torchao; bf16 is the reference")
    args.variant_list = variants
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU here; use --variant tiny --device cpu for a smoke test")
    if args.device.type != "cuda" and variant_spec(args.variant).needs_cuda:
        parser.error(f"--variant {args.variant} needs a CUDA GPU; on a CPU use --variant tiny")
    for name in ("image_tokens", "text_tokens", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.t0 = time.perf_counter()
    device = args.device
    env = environment_info(device)
    out_path = default_out_path(args.out, env)
    cache_root = fresh_compiler_caches(args.cache_dir)
    payload = {
        "env": env,
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("t0", "variant_list")},
        "compiler_cache": cache_root,
        "torchao": torchao_status(),
        "rows": [],
    }
    log(f"torchao: {payload['torchao'].get('version') or payload['torchao']['error'].splitlines()[0]}")
    log(f"building synthetic {args.variant} transformer (bf16, {device}) ...")
    base = synthetic_transformer(args.variant, device)
    config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    inputs = make_inputs(config, args.image_tokens, args.text_tokens, device)
    flops = step_flops(config, args.image_tokens, args.text_tokens)
    payload["shape"] = {"image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "flops": flops}

    log("bf16 ...")
    bf16 = run_eager("bf16", base, None, args, inputs, None, flops)
    reference = bf16.pop("output", None)
    payload["rows"].append(bf16)
    write(out_path, payload)
    for name, quantize in (("ours", quantize_ours), ("torchao", quantize_torchao)):
        if name not in args.variant_list or reference is None:
            continue
        if name == "torchao" and not payload["torchao"]["available"]:
            payload["rows"].append({"variant": name, "error": "torchao unavailable: " + payload["torchao"]["error"]})
            continue
        log(f"{name} ...")
        model = copy.deepcopy(base)  # the same weights; quantised in place
        row = run_eager(name, model, quantize, args, inputs, reference, flops)
        run_compiled(row, model, args, inputs, reference, flops)
        payload["rows"].append(row)
        del model
        free(device)
        write(out_path, payload)
    if reference is not None:
        log("bf16 compiled ...")  # last: it compiles `base` in place, which the others were copied from
        run_compiled(bf16, base, args, inputs, reference, flops)
    payload["elapsed_s"] = round(time.perf_counter() - args.t0, 1)
    write(out_path, payload)
    log(f"wrote {out_path} ({payload['elapsed_s']} s)")
    log(format_table(payload["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
