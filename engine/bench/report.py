"""What engine.bench writes and prints: the table, the JSON / CSV / PNG files, the verdict lines. No torch here."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import write_atomically, write_with_fallback

BASELINE_LABEL = "diffusers"


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


TABLE_COLUMNS = (
    ("res", lambda r: f"{r['width']}x{r['height']}"),
    ("config", lambda r: r["config"]),
    ("ms/step", lambda r: _fmt(r["ms_per_step"], ".1f")),
    ("TFLOP/s", lambda r: _fmt(r["tflops"], ".1f")),
    ("speed-up", lambda r: _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else "")),
    ("encode s", lambda r: _fmt(r["encode_s"], ".3f")),
    ("denoise s", lambda r: _fmt(r["denoise_s"], ".3f")),
    ("decode s", lambda r: _fmt(r["decode_s"], ".3f")),
    ("total s", lambda r: _fmt(r["total_s"], ".3f")),
    ("alloc GiB", lambda r: _fmt(r["peak_allocated_gib"], ".2f")),
    ("resv GiB", lambda r: _fmt(r["peak_reserved_gib"], ".2f")),
    ("NVML GiB", lambda r: _fmt(r["nvml_used_gib"], ".2f")),
    (
        "compile s cold/warm",
        lambda r: _fmt(r.get("compile_cold_s"), ".1f") + "/" + _fmt(r.get("compile_warm_s"), ".1f"),
    ),
    ("PSNR dB", lambda r: _fmt(r["psnr_db"], ".1f")),
    ("latent err", lambda r: _fmt(r["latent_rel_err"], ".2e")),
)


BUDGET_COLUMNS = (
    ("budget GiB", lambda r: _fmt(r["budget_gib"], "g")),
    ("res", lambda r: f"{r['width']}x{r['height']}"),
    ("plan", lambda r: r["engine_config"] or "-"),
    ("predicted GiB", lambda r: _fmt(r["predicted_peak_gib"], ".2f")),
    ("peak alloc GiB", lambda r: _fmt(r["peak_allocated_gib"], ".2f")),
    ("peak resv GiB", lambda r: _fmt(r["peak_reserved_gib"], ".2f")),
    ("under budget", lambda r: _under_budget(r)),
    ("total s", lambda r: _fmt(r["total_s"], ".2f")),
    ("ms/step", lambda r: _fmt(r["ms_per_step"], ".1f")),
)


def _under_budget(row: dict) -> str:
    if row.get("error"):
        return "OOM"
    if row["peak_reserved_gib"] is None:
        return "-"
    return "yes" if row["peak_reserved_gib"] <= row["budget_gib"] else "NO"


def format_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    header = [name for name, _ in columns]
    body = [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> None:
    """Written atomically (a crash mid-write never leaves a half file where a result was), mode 0644."""

    def write(tmp: Path) -> None:
        with tmp.open("w") as f:
            json.dump(_json_safe(payload), f, indent=2)
            f.write("\n")

    write_atomically(path, write)


# CPU results: a record of nothing a GPU user can use, kept out of the committed results (.gitignore)
CPU_RESULTS = "benchmarks/results/cpu"


def default_out_dir(on_gpu: bool) -> Path:
    return Path("benchmarks/results" if on_gpu else CPU_RESULTS)


def default_out_path(env: dict) -> Path:
    card = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    card = "".join(c for c in card if c.isalnum() or c in "-_.")
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    folder = default_out_dir(bool(env.get("gpu")))
    return folder / f"bench-{card}-{stamp}.json"


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    fields = list(rows[0]) if rows else []

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(_json_safe(rows))

    write_atomically(path, write)


def write_plot(path: Path, result: dict) -> None:
    import matplotlib.pyplot as plt

    figure = make_figure(result)
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)


def make_figure(result: dict):
    """One size: bars from zero (ms per step with its p20-p80 spread, seconds per image split into its phases, peak
    memory on a GPU). Several sizes: ms per step and peak memory against megapixels, a line per config with its
    p20-p80 band. A CPU run has no memory panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r.get("error")]
    with_memory = any(r["peak_allocated_gib"] is not None for r in rows)
    single_size = len({(r["height"], r["width"]) for r in rows}) == 1
    panels = (3 if single_size else 2) if with_memory else (2 if single_size else 1)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.4), squeeze=False)
    axes = list(axes[0])
    env = result["env"]
    card = env.get("gpu") or "CPU"
    if single_size:
        _plot_bars(axes, rows, with_memory)
        title = f"{rows[0]['width']}x{rows[0]['height']}, " if rows else ""
    else:
        _plot_lines(axes, rows, with_memory)
        title = ""
    steps = rows[0]["steps"] if rows else "-"
    fig.suptitle(
        f"{result['model']}{task_label(result)} {result['dtype']} on {card}, {title}{steps} steps | "
        f"commit {env['commit']} | {env['date'][:16]}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def task_label(result: dict) -> str:
    task = result.get("task", "text-to-image")
    return "" if task == "text-to-image" else f" ({task})"


def _plot_bars(axes, rows: list[dict], with_memory: bool) -> None:
    labels = [r["config"] for r in rows]
    positions = range(len(rows))
    colors = [f"C{i}" for i in positions]
    latency, per_image = axes[0], axes[1]
    medians = [r["ms_per_step"] for r in rows]
    spread = [
        [r["ms_per_step"] - r["ms_per_step_p20"] for r in rows],
        [r["ms_per_step_p80"] - r["ms_per_step"] for r in rows],
    ]
    latency.bar(positions, medians, yerr=spread, capsize=6, color=colors)
    for x, r in zip(positions, rows, strict=True):
        note = f"{r['ms_per_step']:.0f} ms" + (f"\n{r['speedup']:.2f}x" if r.get("speedup") else "")
        latency.annotate(note, (x, r["ms_per_step"]), ha="center", va="bottom", fontsize=8,
                         xytext=(0, 4), textcoords="offset points")  # fmt: skip
    latency.set(ylabel="ms per transformer step (median, p20-p80)", title="latency per step")
    from matplotlib.patches import Patch

    bottom = [0.0] * len(rows)
    legend = []
    for phase, hatch in (("encode_s", "//"), ("denoise_s", ""), ("decode_s", "..")):
        values = [r[phase] for r in rows]
        per_image.bar(positions, values, bottom=bottom, color=colors, hatch=hatch, edgecolor="white")
        legend.append(Patch(facecolor="0.6", hatch=hatch, edgecolor="white", label=phase.removesuffix("_s")))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, r in zip(positions, rows, strict=True):
        per_image.annotate(f"{r['total_s']:.2f} s", (x, r["total_s"]), ha="center", va="bottom", fontsize=8,
                           xytext=(0, 4), textcoords="offset points")  # fmt: skip
    per_image.set(ylabel="seconds per image", title="one image: encode / denoise / decode")
    per_image.legend(handles=legend, fontsize=8, loc="lower right")
    if with_memory:
        memory = axes[2]
        memory.bar(positions, [r["peak_allocated_gib"] or 0.0 for r in rows], color=colors)
        for x, r in zip(positions, rows, strict=True):
            if r["peak_allocated_gib"] is not None:
                memory.annotate(f"{r['peak_allocated_gib']:.1f} GiB", (x, r["peak_allocated_gib"]), ha="center",
                                va="bottom", fontsize=8, xytext=(0, 4), textcoords="offset points")  # fmt: skip
        memory.set(ylabel="peak allocated GiB", title="peak memory")
    for axis in axes:
        axis.margins(y=0.15)  # room for the labels above the bars
        axis.set_xticks(list(positions), labels, rotation=15, ha="right", fontsize=8)
        axis.set_ylim(bottom=0)
        axis.grid(axis="y", alpha=0.3)


def _plot_lines(axes, rows: list[dict], with_memory: bool) -> None:
    latency = axes[0]
    for index, config in enumerate(dict.fromkeys(r["config"] for r in rows)):
        mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["height"] * r["width"])
        pixels = [r["height"] * r["width"] / 1e6 for r in mine]
        color = f"C{index}"
        latency.plot(pixels, [r["ms_per_step"] for r in mine], marker="o", color=color, label=config)
        latency.fill_between(pixels, [r["ms_per_step_p20"] for r in mine], [r["ms_per_step_p80"] for r in mine],
                             color=color, alpha=0.2)  # fmt: skip
        if with_memory:
            axes[1].plot(pixels, [r["peak_allocated_gib"] for r in mine], marker="o", color=color, label=config)
    latency.set(xlabel="megapixels", ylabel="ms per transformer step (median, p20-p80 band)", title="latency")
    if with_memory:
        axes[1].set(xlabel="megapixels", ylabel="peak allocated GiB", title="peak memory")
    for axis in axes:
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "no row ran (see the errors)", ha="center", va="center", transform=axis.transAxes)


def verdicts(result: dict) -> list[str]:
    """One line per engine row against the baseline of its size: speed per step and per image, memory, PSNR."""
    rows = result["rows"]
    baselines = {(r["height"], r["width"]): r for r in rows if r["config"] == BASELINE_LABEL}
    lines = []
    for row in rows:
        base = baselines.get((row["height"], row["width"]))
        if row["config"] == BASELINE_LABEL or base is None or row.get("error") or not row.get("speedup"):
            continue
        runs = f"{row['runs']} run" + ("s" if row["runs"] > 1 else "")
        if row.get("step_cache"):
            lines.append(_cache_verdict(row, base, runs, result.get("baseline_cache")))
            continue
        parts = [
            f"{row['speedup']:.2f}x per step ({row['ms_per_step']:.0f} vs {base['ms_per_step']:.0f} ms, p20-p80 "
            f"{row['ms_per_step_p20']:.0f}-{row['ms_per_step_p80']:.0f} vs "
            f"{base['ms_per_step_p20']:.0f}-{base['ms_per_step_p80']:.0f})",
            f"{row['total_s']:.2f} vs {base['total_s']:.2f} s per image",
        ]
        if row["peak_allocated_gib"] is not None and base["peak_allocated_gib"] is not None:
            parts.append(f"peak {row['peak_allocated_gib']:.1f} vs {base['peak_allocated_gib']:.1f} GiB")
        if row.get("psnr_db") is not None:
            parts.append(f"PSNR {_fmt(row['psnr_db'], '.1f')} dB")
        if row.get("lora"):  # both sides ran with the adapter
            parts.append(_lora_figures(row))
        task = result.get("task", "text-to-image")
        versus = "diffusers" if task == "text-to-image" else f"diffusers ({task})"
        lines.append(
            f"flux-engine {row['config']} vs {versus}, {row['width']}x{row['height']}, {row['steps']} steps x "
            f"{runs}: " + ", ".join(parts)
        )
    return lines


def _cache_verdict(row: dict, base: dict, runs: str, baseline_cache: str | None) -> str:
    cache = row["step_cache"]
    versus = f"diffusers with its {baseline_cache}" if baseline_cache else "diffusers uncached"
    text = (
        f"flux-engine {row['config']} vs {versus}, {row['width']}x{row['height']}, {row['steps']} steps x {runs}: "
        f"{row['total_s']:.2f} vs {base['total_s']:.2f} s per image ({_fmt(row.get('speedup'), '.2f')}x), "
        f"{cache['full_steps']} steps full, {cache['skipped_steps']} skipped"
    )
    if cache.get("uncached_total_s") is not None:
        text += f"; uncached {cache['uncached_total_s']:.2f} s ({cache['speedup_vs_uncached']:.2f}x)"
    if cache.get("psnr_vs_uncached_db") is not None:
        text += (
            f", vs uncached PSNR {_fmt(cache['psnr_vs_uncached_db'], '.1f')} dB, SSIM {cache['ssim_vs_uncached']:.4f}, "
            f"latent err {cache['latent_err_vs_uncached']:.2e}"
        )
    if cache.get("full_step_overhead") is not None:
        text += f"; nothing skipped: {cache['full_step_overhead']:.3f}x the uncached ms/step"
    return text


def _lora_figures(row: dict) -> str:
    text = f"LoRA {row['lora']} active on both"
    if row.get("lora_off_ms_per_step"):
        text += (
            f" ({row['ms_per_step'] / row['lora_off_ms_per_step']:.3f}x the config's {row['lora_off_ms_per_step']:.0f}"
            " ms/step without it)"
        )
    if row.get("lora_swap_s") is not None:
        text += (
            f", hot-swap {row['lora_swap_s']:.2f} s ({row['lora_swap_recompiles']} recompiles, "
            f"{row['lora_swap_captures']} CUDA-graph captures after it)"
        )
    return text


def save_results(result: dict, out: Path) -> Path | None:
    """The JSON, CSV and PNG at `out`; if that fails now (the disk filled, the folder went away), at a fallback
    path instead, so that a long benchmark is never lost; when nothing can be written, the JSON goes to stdout.
    Returns where the JSON went (None: stdout)."""
    written = write_with_fallback(out, lambda path: _write_all(result, path), "the results")
    if written is None:
        print(json.dumps(_json_safe(result), indent=2))
    return written


def _write_all(result: dict, out: Path) -> None:
    write_json(out, result)
    write_csv(out.with_suffix(".csv"), result["rows"])
    write_plot(out.with_suffix(".png"), result)
