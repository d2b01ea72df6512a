"""Regenerate the results page benchmarks/RESULTS.md (linked from the README) from benchmarks/results/*.json.

    python benchmarks/make_readme_table.py           # write benchmarks/RESULTS.md
    python benchmarks/make_readme_table.py --check   # exit 1 if benchmarks/RESULTS.md is out of date or missing

Only GPU runs enter the page. The engine table keeps the newest measurement per (card, preset, size); the
planner, VAE, torchao and kernel tables come from the newest file of each kind. Every row names its card, date
and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "benchmarks" / "RESULTS.md"


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    data["_file"] = path.name
    return data


def _gpu_results(pattern: str) -> list[dict]:
    """Result files of GPU runs only: a CPU run (the tiny model, e.g. the README's command on a laptop) says
    nothing about speed and must not change the table."""
    return [d for d in (_load(p) for p in sorted(RESULTS.glob(pattern))) if d.get("env", {}).get("gpu")]


def _num(value, spec: str) -> str:
    if value is None:
        return "-"
    if value == "inf":
        return "inf"
    return format(value, spec)


def _card(env: dict) -> str:
    return (env.get("gpu") or "CPU").replace("NVIDIA ", "")


def _stamp(env: dict) -> str:
    return (env.get("date") or "")[:10]


def engine_table(files: list[dict]) -> list[str]:
    """The newest measurement of each (card, config, size), beside the diffusers baseline of its own run."""
    newest: dict[tuple, tuple[dict, dict]] = {}
    for data in sorted(files, key=lambda d: d["env"].get("date", "")):
        for row in data["rows"]:
            plain = row.get("budget_gib") is None and "gpus" not in row and not row.get("lora") and not _task(data)
            plain = plain and not row.get("step_cache")
            if row["config"] != "diffusers" and plain:
                newest[(_card(data["env"]), row["config"], row["height"], row["width"])] = (data, row)
    lines = [
        "| card | date | commit | model | size | preset | ms/step | diffusers ms/step | speed-up | TFLOP/s "
        "| peak alloc GiB | compile s cold / warm | PSNR dB vs diffusers | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # presets in the order the runs listed them (the ladder's order), newest run first
    listed = list(dict.fromkeys(p for d in sorted(files, key=lambda d: d["env"].get("date", ""), reverse=True)
                                for p in d.get("presets") or []))  # fmt: skip
    rank = {name: i for i, name in enumerate(listed)}
    order = sorted(newest, key=lambda k: (k[0], k[2] * k[3], rank.get(k[1], len(rank)), k[1]))
    for key in order:
        data, row = newest[key]
        env = data["env"]
        baseline = {(r["height"], r["width"]): r for r in data["rows"] if r["config"] == "diffusers"}
        base = baseline.get((row["height"], row["width"]), {})
        compile_s = "-"
        if row.get("compile_cold_s") is not None:
            compile_s = f"{_num(row['compile_cold_s'], '.1f')} / {_num(row.get('compile_warm_s'), '.1f')}"
        lines.append(
            f"| {_card(env)} | {_stamp(env)} | {env.get('commit', '-')} | {data.get('model', '-')} "
            f"| {row['width']}x{row['height']} | {row['config']} | {_num(row['ms_per_step'], '.1f')} "
            f"| {_num(base.get('ms_per_step'), '.1f')} | {_num(row.get('speedup'), '.2f')}x "
            f"| {_num(row.get('tflops'), '.0f')} | {_num(row.get('peak_allocated_gib'), '.2f')} | {compile_s} "
            f"| {_num(row.get('psnr_db'), '.1f')} | `{data['_file']}` |"
        )
    return lines


def parallel_table(files: list[dict]) -> list[str]:
    """Context parallelism (`engine.bench --gpus N`): each N-GPU row beside the same config on one GPU, same run."""
    lines = [
        "Several GPUs (`torchrun --nproc-per-node N -m engine.bench --gpus N`), each beside the same config on one "
        "GPU of the same machine in the same run; peak memory is the fullest GPU's; PSNR is against the one-GPU image.",
        "",
        "| card | date | commit | size | steps | config | GPUs | s/image | 1 GPU s/image | time vs 1 GPU | ms/step "
        "| 1 GPU ms/step | peak GiB per GPU | 1 GPU peak GiB | PSNR dB vs 1 GPU | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in sorted(files, key=lambda d: d["env"].get("date", "")):
        env = data["env"]
        singles = {(r["height"], r["width"]): r for r in data["rows"] if r.get("gpus") == 1}
        for row in data["rows"]:
            single = singles.get((row["height"], row["width"]), {})
            if row.get("gpus", 1) == 1:
                continue
            lines.append(
                f"| {_card(env)} | {_stamp(env)} | {env.get('commit', '-')} | {row['width']}x{row['height']} "
                f"| {row['steps']} | {row['config']} | {row['gpus']} | {_num(row['total_s'], '.2f')} "
                f"| {_num(single.get('total_s'), '.2f')} | {_num(row.get('time_vs_one_gpu'), '.2f')}x "
                f"| {_num(row['ms_per_step'], '.1f')} | {_num(single.get('ms_per_step'), '.1f')} "
                f"| {_num(row.get('peak_allocated_gib'), '.2f')} | {_num(single.get('peak_allocated_gib'), '.2f')} "
                f"| {_num(row.get('psnr_db'), '.1f')} | `{data['_file']}` |"
            )
    return lines


def budget_table(data: dict) -> list[str]:
    """The planner's configs under `--vram` budgets, run with the GPU capped to each budget."""
    env = data["env"]
    baseline = {(r["height"], r["width"]): r for r in data["rows"] if r["config"] == "diffusers"}
    lines = [
        f"Memory planner (`python -m engine.bench --vram 6,8,12,16,24,48 --res 1024 2048`), {_card(env)} capped to "
        f"each budget, {_stamp(env)}, commit {env.get('commit', '-')} (`{data['_file']}`):",
        "",
        "| budget GiB | size | plan | predicted GiB | peak alloc GiB | peak reserved GiB | under budget | ms/step "
        "| diffusers ms/step (uncapped) | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted((r for r in data["rows"] if r.get("budget_gib") is not None),
                      key=lambda r: (r["height"] * r["width"], r["budget_gib"])):  # fmt: skip
        base = baseline.get((row["height"], row["width"]), {})
        if row.get("error"):
            verdict = "out of memory"
        else:
            verdict = "yes" if row["peak_reserved_gib"] <= row["budget_gib"] else "NO"
        lines.append(
            f"| {row['budget_gib']:g} | {row['width']}x{row['height']} | {row.get('engine_config') or '-'} "
            f"| {_num(row.get('predicted_peak_gib'), '.2f')} | {_num(row.get('peak_allocated_gib'), '.2f')} "
            f"| {_num(row.get('peak_reserved_gib'), '.2f')} | {verdict} | {_num(row.get('ms_per_step'), '.1f')} "
            f"| {_num(base.get('ms_per_step'), '.1f')} | {_num(row.get('total_s'), '.2f')} |"
        )
    return lines


def vae_table(data: dict) -> list[str]:
    env = data["env"]
    lines = [
        f"VAE decode, flux-dev VAE bf16, {_card(env)}, {_stamp(env)}, commit {env.get('commit', '-')} "
        f"(`{data['_file']}`, `python -m benchmarks.bench_vae`):",
        "",
        "| size | decode | ms | x untiled | extra GiB | predicted GiB | PSNR dB vs untiled | tiles |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['width']}x{row['height']} | {row['config']} | {_num((row.get('ms') or {}).get('median'), '.1f')} "
            f"| {_num(row.get('x_untiled'), '.2f')} | {_num(row.get('peak_extra_gib'), '.2f')} "
            f"| {_num(row.get('predicted_gib'), '.2f')} | {_num(row.get('psnr_db'), '.1f')} | {row.get('tiles', '-')} |"
        )
    return lines


def torchao_table(data: dict) -> list[str]:
    env = data["env"]
    lines = [
        f"fp8 W8A8 on the transformer: ours (`torch._scaled_mm` row-wise) vs torchao "
        f"`Float8DynamicActivationFloat8WeightConfig(PerRow)`, one forward at 1024^2, {_card(env)}, {_stamp(env)}, "
        f"commit {env.get('commit', '-')} (`{data['_file']}`):",
        "",
        "| variant | weights GiB | eager ms | compiled ms | compile s | SQNR dB vs bf16 (compiled) |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        eager, compiled = row.get("eager") or {}, row.get("compiled") or {}
        lines.append(
            f"| {row['variant']} | {_num(row.get('weight_gib'), '.2f')} "
            f"| {_num((eager.get('ms') or {}).get('median'), '.1f')} "
            f"| {_num((compiled.get('ms') or {}).get('median'), '.1f')} | {_num(compiled.get('compile_s'), '.1f')} "
            f"| {_num(compiled.get('sqnr_db'), '.1f')} |"
        )
    return lines


def _timing(data: dict) -> str:
    rows = data.get("rows", [])
    if any("gpu_ms" in r for r in rows):
        return "device time from a CUDA graph, launch overhead excluded"
    return "eager do_bench time"


def attention_table(data: dict) -> list[str]:
    rows = [r for r in data["rows"] if r.get("status", "ok") == "ok" and r.get("tflops")]
    lengths = sorted({r["tokens"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    value = {(r["impl"], r["tokens"]): r["tflops"] for r in rows}
    env = data["env"]
    lines = [
        f"Attention forward, B=1 H=24 D=128 bf16, TFLOP/s (median; {_timing(data)}), {_card(env)}, {_stamp(env)}, "
        f"commit {env.get('commit', '-')} (`{data['_file']}`):",
        "",
        "| implementation | " + " | ".join(f"L={n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for impl in impls:
        cells = [_num(value.get((impl, n)), ".0f") for n in lengths]
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    return lines


def norm_table(data: dict) -> list[str]:
    env = data["env"]
    rows = [r for r in data["rows"] if r.get("status", "ok") == "ok" and r.get("gbps")]
    lines = [
        f"Memory-bound kernels, GB/s (median; {_timing(data)}) and % of the measured copy ceiling, {_card(env)}, "
        f"{_stamp(env)}, "
        f"commit {env.get('commit', '-')} (`{data['_file']}`):",
        "",
        "| op | shape | implementation | GB/s | % of copy |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        gbps, pct = _num(r["gbps"], ".0f"), _num(r.get("pct_of_copy"), ".0f")
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {gbps} | {pct}% |")
    return lines


def newest(pattern: str) -> dict | None:
    files = _gpu_results(pattern)
    return max(files, key=lambda d: d["env"].get("date", "")) if files else None


def _task(data: dict) -> str | None:
    """The task of a run other than text-to-image (engine.bench --task), else None."""
    task = data.get("task", "text-to-image")
    return None if task == "text-to-image" else task


def _engine_rows(files: list[dict], keep=lambda row: True):
    """(file, env, row, its diffusers baseline row or {}) for every engine row `keep` takes, oldest file first."""
    for data in sorted(files, key=lambda d: d["env"].get("date", "")):
        baseline = {(r["height"], r["width"]): r for r in data["rows"] if r["config"] == "diffusers"}
        for row in data["rows"]:
            if row["config"] != "diffusers" and keep(row):
                yield data, data["env"], row, baseline.get((row["height"], row["width"]), {})


def task_table(files: list[dict]) -> list[str]:
    """engine.bench --task: every row, oldest first, beside diffusers' pipeline class of the task in the same run."""
    lines = [
        "Other FLUX.1 pipelines (`engine.bench --task TASK`): each config beside diffusers' own class of the task "
        "(FluxKontextPipeline, FluxFillPipeline, ...) with the same synthetic inputs, in the same run; ms/step is one "
        "transformer forward (Kontext's covers its input picture's tokens too).",
        "",
        "| card | date | commit | task | model | size | steps | config | ms/step | diffusers ms/step | speed-up "
        "| s/image | diffusers s/image | peak GiB | PSNR dB | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, env, row, base in _engine_rows(files):
        lines.append(
            f"| {_card(env)} | {_stamp(env)} | {env.get('commit', '-')} | {data['task']} "
            f"| {data['model'].removeprefix('synthetic:')} | {row['width']}x{row['height']} | {row['steps']} "
            f"| {row['config']} | {_num(row['ms_per_step'], '.1f')} | {_num(base.get('ms_per_step'), '.1f')} "
            f"| {_num(row.get('speedup'), '.2f')}x | {_num(row['total_s'], '.2f')} "
            f"| {_num(base.get('total_s'), '.2f')} | {_num(row.get('peak_allocated_gib'), '.2f')} "
            f"| {_num(row.get('psnr_db'), '.1f')} | `{data['_file']}` |"
        )
    return lines


def cache_table(files: list[dict]) -> list[str]:
    """engine.bench --cache: every row, oldest first: the cached config beside itself uncached (same process) and
    diffusers with its own hook of the same rule (same run); seconds per image."""
    lines = [
        "Step caching (`engine.bench --cache RULE`): each config with the cache beside the same config uncached (same "
        "process) and diffusers with its own hook of the same rule and parameters (same run); fidelity against the "
        "uncached config. Synthetic weights make the fidelity a mechanics check: measure a real checkpoint with "
        "`--model PATH`.",
        "",
        "| card | date | commit | size | steps | config | full / skipped steps | s/image | uncached s/image "
        "| diffusers (its cache) s/image | vs diffusers | PSNR dB / SSIM vs uncached | cost a full step | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, env, row, base in _engine_rows(files, lambda row: row.get("step_cache")):
        cache = row["step_cache"]
        overhead = cache.get("full_step_overhead")
        lines.append(
            f"| {_card(env)} | {_stamp(env)} | {env.get('commit', '-')} | {row['width']}x{row['height']} "
            f"| {row['steps']} | {row['config']} | {cache['full_steps']} / {cache['skipped_steps']} "
            f"| {_num(row['total_s'], '.2f')} | {_num(cache.get('uncached_total_s'), '.2f')} "
            f"| {_num(base.get('total_s'), '.2f')} | {_num(row.get('speedup'), '.2f')}x "
            f"| {_num(cache.get('psnr_vs_uncached_db'), '.1f')} / {_num(cache.get('ssim_vs_uncached'), '.4f')} "
            f"| {f'{overhead:.3f}x' if overhead else '-'} | `{data['_file']}` |"
        )
    return lines


def lora_table(files: list[dict]) -> list[str]:
    """engine.bench --lora: every row, oldest first (each run's commit differs): the config with the adapter active,
    the same config before it was loaded (same process), and diffusers with the same adapter (same run)."""
    lines = [
        "LoRA (`engine.bench --lora synthetic:RANK`): each config with the adapter active beside the same config "
        "before it was loaded (same process) and diffusers with the same adapter (same run); PSNR against diffusers "
        "with it. Synthetic adapters before commit 7250a61 had factors of std 0.1 (B @ A 8-17x the weights' RMS), "
        "since then 10% of each weight's RMS: the PSNR of the two differ, the times do not.",
        "",
        "| card | date | commit | size | steps | config | adapter | ms/step | without it | cost | diffusers ms/step "
        "| s/image | peak GiB | without it | hot-swap s | recompiles / captures | PSNR dB | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, env, row, base in _engine_rows(files, lambda row: row.get("lora")):
        off = row.get("lora_off_ms_per_step")
        cost = f"{row['ms_per_step'] / off:.3f}x" if off else "-"
        swap = "-"
        if row.get("lora_swap_s") is not None:
            swap = f"{row['lora_swap_recompiles']} / {row['lora_swap_captures']}"
        lines.append(
            f"| {_card(env)} | {_stamp(env)} | {env.get('commit', '-')} | {row['width']}x{row['height']} "
            f"| {row['steps']} | {row['config']} | {row['lora']} | {_num(row['ms_per_step'], '.1f')} "
            f"| {_num(off, '.1f')} | {cost} | {_num(base.get('ms_per_step'), '.1f')} "
            f"| {_num(row['total_s'], '.2f')} | {_num(row.get('peak_allocated_gib'), '.2f')} "
            f"| {_num(row.get('lora_off_peak_gib'), '.2f')} | {_num(row.get('lora_swap_s'), '.2f')} | {swap} "
            f"| {_num(row.get('psnr_db'), '.1f')} | `{data['_file']}` |"
        )
    return lines


def startup_table(files: list[dict]) -> list[str]:
    """benchmarks/startup.py: every run, oldest file first: a fresh process's start-up and each new size's first call,
    as seconds more than the warm call at the same size."""
    lines = [
        "Start-up (`python -m benchmarks.startup`): each row a fresh process with its own cache folder (cold: empty; "
        "warm: filled by the cold row above it); seconds a first call takes more than the warm call at its size; "
        "kernel tuning per process (before `flux_kernels.tuning`) or from the tables; a process marked "
        '"(profiled)" ran its first call under cProfile, which inflates it: a profile, not a start-up figure.',
        "",
        "| card | date | commit | preset | tuning | process | start-up s (size) | dynamo s | new sizes: extra s "
        "(keys tuned) | file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in sorted(files, key=lambda d: d["env"].get("date", "")):
        env = data["env"]
        for run in data["runs"]:
            if "sizes" not in run:
                continue
            first, *later = run["sizes"]
            dynamo = first["first"]["dynamo_compile_s"]
            extras = ", ".join(f"{r['size']} {r['extra_s']:.2f} ({r['first']['keys_tuned']})" for r in later)
            lines.append(
                f"| {_card(env)} | {_stamp(env)} | {env.get('commit') or '-'} | {run['preset']} | {run['mode']} "
                f"| {run['start']}{' (profiled)' if run.get('profiled') else ''} | {first['extra_s']:.2f} "
                f"({first['size']}) | {dynamo:.1f} "
                f"| {extras} | `{data['_file']}` |"
            )
    return lines


def render() -> str:
    benches = _gpu_results("bench-*.json")
    if not benches:
        return "No GPU results are recorded yet."
    parts = [
        "Generated by `python benchmarks/make_readme_table.py` from `benchmarks/results/` (the newest measurement "
        "per card, preset and size). Synthetic FLUX.1-dev weights, bf16, 4 steps, batch 1; ms/step is one "
        "transformer forward; the diffusers column is the baseline measured in the same run.",
        "",
        *engine_table(benches),
    ]
    parallel = [d for d in benches if d.get("parallel")]
    if parallel:
        parts += ["", *parallel_table(parallel)]
    tasks = [d for d in benches if _task(d)]
    if tasks:
        parts += ["", *task_table(tasks)]
    cached = [d for d in benches if any(r.get("step_cache") for r in d["rows"])]
    if cached:
        parts += ["", *cache_table(cached)]
    lora = [d for d in benches if any(r.get("lora") for r in d["rows"])]
    if lora:
        parts += ["", *lora_table(lora)]
    budgets = [d for d in benches if any(r.get("budget_gib") is not None for r in d["rows"])]
    if budgets:
        parts += ["", *budget_table(max(budgets, key=lambda d: d["env"].get("date", "")))]
    vae = newest("vae-*.json")
    if vae:
        parts += ["", *vae_table(vae)]
    torchao = newest("torchao-*.json")
    if torchao:
        parts += ["", *torchao_table(torchao)]
    attention = newest("attention-*.json")
    if attention:
        parts += ["", *attention_table(attention)]
    norm = newest("norm-*.json")
    if norm:
        parts += ["", *norm_table(norm)]
    startup = _gpu_results("startup*.json")
    if startup:
        parts += ["", *startup_table(startup)]
    return "\n".join(parts)


def page() -> str:
    """The whole results page: title, provenance, a link back to the README, then the tables of render()."""
    head = [
        "# flux-engine results",
        "",
        "Generated by `python benchmarks/make_readme_table.py` from `benchmarks/results/` (GPU runs only). The "
        "weights are synthetic (random init), so the PSNR figures are a floor check on the mechanics, not a "
        "quality claim: measure your own checkpoint with `python -m engine.bench --model PATH`.",
        "",
        "Back to the [README](../README.md).",
        "",
    ]
    return "\n".join([*head, render()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if benchmarks/RESULTS.md is not up to date")
    args = parser.parse_args(argv)
    new = page()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else None
        if new != current:
            state = "missing" if current is None else "out of date"
            print(f"{PAGE.name} is {state}: run python benchmarks/make_readme_table.py")
            return 1
        return 0
    PAGE.write_text(new)
    print(f"{PAGE.name} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
