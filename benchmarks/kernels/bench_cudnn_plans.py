"""Every execution plan cuDNN offers for the engine's fp8 SDPA graph (flux_kernels.cudnn_attention), timed at
FLUX's attention lengths: the plans its heuristics list (modes A, B and the fallback list), then, for each engine
among them, the engine's knob settings (tile sizes, stages, warp specialisation...) one by one. The engine runs
heuristic A's first plan; this says whether another one is faster, and by how much.

    python -m benchmarks.kernels.bench_cudnn_plans --lengths 4608 8704 16896 --out results/cudnn-plans-<gpu>-<date>.json

Each plan: built, run on the same e4m3 inputs (B=1, H=24, D=128, contiguous [B, H, L, D] as the QK-norm kernel
writes them, output [B, L, H, D] as the engine's), its e4m3 output compared with heuristic A's first plan (codes
that differ, largest difference after the cast back), then timed with CUDA events (median of 20 calls after 3).
TFLOP/s = 4 B H L^2 D / time. Needs CUDA and the cudnn-frontend package: exits 2 without them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

import torch

from engine.measure import environment_info, event_ms
from flux_kernels import cudnn_attention as cudnn_fp8

HEADS, HEAD_DIM = 24, 128
CALLS = 20
KNOB_COMBINATIONS = 64  # per engine, at most; each knob's values one at a time first, then the product


def log(*parts) -> None:
    print(*parts, flush=True)


def inputs(tokens: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn():
        return torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)

    (q8, q_descale), (k8, k_descale) = cudnn_fp8.quantize_tensor(randn()), cudnn_fp8.quantize_tensor(randn() * 3)
    v8, _ = cudnn_fp8.quantize_v_channels(randn())
    return q8, k8, v8, q_descale, k_descale


def new_output(tokens: int) -> torch.Tensor:
    return torch.empty(1, tokens, HEADS, HEAD_DIM, dtype=cudnn_fp8.FP8, device="cuda").transpose(1, 2)


class Sweep:
    """One length's graph and the plans tried on it, in the order they were enqueued."""

    def __init__(self, tokens: int, budget_s: float):
        self.tokens, self.deadline = tokens, time.monotonic() + budget_s
        self.cudnn = cudnn_fp8.import_cudnn()
        self.q8, self.k8, self.v8, self.q_descale, self.k_descale = inputs(tokens)
        out = new_output(tokens)
        self.graph = cudnn_fp8.operation_graph(
            self.q8.device, tuple(self.q8.shape), self.q8.stride(), tuple(self.k8.shape), self.k8.stride(),
            self.v8.stride(), out.stride(), HEAD_DIM**-0.5,
        )  # fmt: skip
        self.handle = cudnn_fp8.cudnn_handle(self.q8.device)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.reference = None
        self.rows: list[dict] = []

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def enqueue_heuristics(self) -> list[int]:
        """Plans of each heuristic mode, enqueued one mode at a time (a mode that fails leaves the others)."""
        indices = []
        for mode in ("A", "B", "FALLBACK"):
            before = self.graph.get_execution_plan_count()
            try:
                self.graph.create_execution_plans([getattr(self.cudnn.heur_mode, mode)])
            except Exception as err:  # noqa: BLE001 - recorded; the other modes still run
                self.rows.append({"source": f"heuristic {mode}", "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            after = self.graph.get_execution_plan_count()
            log(f"  heuristic {mode}: {after - before} plans")
            indices += [(mode, i) for i in range(before, after)]
        return indices

    def time_plan(self, index: int, source: str, knobs: dict | None = None) -> dict:
        row = {"source": source, "index": index, "knobs": knobs}
        try:
            self.graph.build_plan_at_index(index)
            row["name"] = self.graph.get_plan_name_at_index(index)
            workspace_size = self.graph.get_workspace_size_plan_at_index(index)
            workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device="cuda")
            out = new_output(self.tokens)
            pack = cudnn_fp8.variant_pack(self.q8, self.k8, self.v8, out, self.q_descale, self.k_descale)

            def call():
                self.graph.execute_plan_at_index(pack, workspace, index, handle=self.handle)

            ms = event_ms(call, calls=CALLS, warmup=3)
        except Exception as err:  # noqa: BLE001 - a plan cuDNN cannot build here: recorded, the sweep goes on
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            return self.add(row)
        flops = 4 * HEADS * self.tokens**2 * HEAD_DIM
        row.update(ms=ms, tflops=flops / ms / 1e9, workspace=workspace_size)
        values = out.float()
        if self.reference is None:
            self.reference = values
        differ = values != self.reference
        row["codes_differ"] = differ.float().mean().item()
        row["max_abs_diff"] = (values - self.reference).abs().max().item()
        return self.add(row)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if "error" in row:
            log(f"    [{row['index']}] {row['source']}: {row['error'][:160]}")
        else:
            name, speed = row["name"][:60], f"{row['ms']:7.3f} ms {row['tflops']:6.0f} TFLOP/s"
            log(f"    [{row['index']}] {row['source']:12s} {name:60s} {speed} differ {row['codes_differ']:.4f} "
                f"max {row['max_abs_diff']:.3g}")  # fmt: skip
        return row

    def knob_sweep(self, engine: int) -> None:
        try:
            knobs = list(self.graph.get_knobs_for_engine(engine))
        except Exception as err:  # noqa: BLE001
            self.rows.append({"source": f"engine {engine} knobs", "error": f"{type(err).__name__}: {err}"[:300]})
            return
        described = [describe_knob(knob) for knob in knobs]
        log(f"  engine {engine} knobs: {described}")
        self.rows.append({"source": f"engine {engine} knobs", "knobs": described})
        choices = [(knob, knob_values(knob)) for knob in knobs]
        for combination in itertools.islice(combinations(choices), KNOB_COMBINATIONS):
            if self.out_of_time():
                log("  out of time for this length")
                return
            setting = {knob.type: value for knob, value in combination}
            try:
                self.graph.create_execution_plan(engine, setting)
            except Exception as err:  # noqa: BLE001
                label = {str(k.type): v for k, v in combination}
                self.rows.append({"source": f"engine {engine}", "knobs": label, "error": f"{err}"[:300]})
                continue
            index = self.graph.get_execution_plan_count() - 1
            self.time_plan(index, f"engine {engine}", {str(k.type): v for k, v in combination})


def describe_knob(knob) -> dict:
    return {name: str(getattr(knob, name, None)) for name in ("type", "min_value", "max_value", "stride")}


def knob_values(knob) -> list[int]:
    low, high = int(getattr(knob, "min_value", 0)), int(getattr(knob, "max_value", 0))
    stride = max(1, int(getattr(knob, "stride", 1) or 1))
    return list(range(low, high + 1, stride))[:64]


def combinations(choices):
    """Each knob's values with the others at their lowest, then the full product (both capped by the caller)."""
    base = [(knob, values[0]) for knob, values in choices if values]
    seen = set()
    for position, (knob, values) in enumerate(choices):
        for value in values:
            combination = list(base)
            combination[position] = (knob, value)
            key = tuple(v for _, v in combination)
            if key not in seen:
                seen.add(key)
                yield combination
    for values in itertools.product(*[v for _, v in choices if v]):
        if values not in seen:
            seen.add(values)
            yield [(knob, value) for (knob, _), value in zip(choices, values, strict=True)]


def sweep(tokens: int, budget_s: float) -> list[dict]:
    log(f"L = {tokens}")
    run = Sweep(tokens, budget_s)
    for mode, index in run.enqueue_heuristics():
        if run.out_of_time():
            break
        run.time_plan(index, f"heuristic {mode}")
    engines = sorted({int(m.group(1)) for row in run.rows if (m := re.match(r"eng(\d+)", str(row.get("name", ""))))})
    for engine in engines:
        if not run.out_of_time():
            run.knob_sweep(engine)
    for row in run.rows:
        row["tokens"] = tokens
    return run.rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4608, 8704, 16896])
    parser.add_argument("--budget", type=float, default=80.0, help="seconds per length (default 80)")
    args = parser.parse_args(argv)
    reason = cudnn_fp8.unavailable_reason()
    if reason is not None:
        print(f"bench_cudnn_plans: {reason}; nothing measured", file=sys.stderr)
        return 2
    rows = [row for tokens in args.lengths for row in sweep(tokens, args.budget)]
    log("\nfastest plan per length (heuristic A's first plan is what the engine runs)")
    for tokens in args.lengths:
        timed = [r for r in rows if r["tokens"] == tokens and "ms" in r]
        if not timed:
            continue
        default = next((r for r in timed if r["source"] == "heuristic A"), timed[0])
        best = min(timed, key=lambda r: r["ms"])
        log(f"  L={tokens:6d} default {default['tflops']:5.0f} TFLOP/s ({default['name'][:40]}) best "
            f"{best['tflops']:5.0f} ({best['name'][:40]}, {best['source']}, knobs {best['knobs']}, differ "
            f"{best['codes_differ']:.4f})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment_info(torch.device("cuda"))
    env["cudnn_backend"] = cudnn_fp8.import_cudnn().backend_version()
    args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
