"""Micro-benchmark: flux_kernels.gelu_fp8.gelu_concat_fp8 (an MLP's tanh GELU, after an optional copied prefix,
quantised per token to e4m3 for the next fp8 GEMM) against the same work compiled by inductor (GELU, concatenation,
quantiser), device time from CUDA graphs with inputs rotated out of L2, at FLUX's token counts (CUDA only).

    python -m benchmarks.kernels.bench_gelu_fp8 --out benchmarks/results/gelu-fp8-<gpu>-<date>.json

`--baseline FILE` times another version of kernels/gelu_fp8.py beside it in the same process (an A/B of a kernel
change: `git show HEAD~1:kernels/gelu_fp8.py > /tmp/gelu_before.py`), and counts the e4m3 codes where the two differ.

benchmarks/bench_fp8_fusion.py runs the same rows beside the norm kernels' fp8 outputs and a profiled forward.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from benchmarks.kernels.bench_norm_ops import HIDDEN, gpu_ms
from engine.measure import environment_info

TOKENS = (4608, 16896)
SETS = 4  # input sets rotated through, so that no call finds its inputs in L2


def log(*parts) -> None:
    print(*parts, flush=True)


# ----------------------------------------------------------------------------- 1. the kernels


def load_baseline(path: Path):
    """Another version of kernels/gelu_fp8.py as a module; its custom op renamed, so that both can register."""
    import importlib.util

    source = path.read_text().replace('"flux_kernels::', '"flux_kernels_baseline::')
    spec = importlib.util.spec_from_loader("gelu_fp8_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - a file the user named, as a module
    return module


def gelu_rows(tokens: int, baseline=None) -> list[dict]:
    """gelu_concat_fp8 vs the same under inductor (GELU, concatenation, quantiser): the double-stream MLP output
    (no prefix) and the single-stream proj_out input (the 3072-wide attention output first); with `baseline`,
    that module's gelu_concat_fp8_fwd too."""
    import torch.nn.functional as F

    from flux_kernels.fp8 import quantize_fp8_rowwise
    from flux_kernels.gelu_fp8 import gelu_concat_fp8

    @torch.compile(dynamic=False)
    def unfused(prefix, x):
        hidden = F.gelu(x, approximate="tanh")
        return quantize_fp8_rowwise(hidden if prefix is None else torch.cat([prefix, hidden], dim=-1))

    rows = []
    for op, prefix_width in (("gelu -> fp8 (double-stream MLP)", 0), ("cat + gelu -> fp8 (single proj_out)", HIDDEN)):
        inputs = []
        for seed in range(SETS):
            generator = torch.Generator(device="cuda").manual_seed(seed)
            # the MLP half of a fused projection's output: a slice, as linear1's
            fused = torch.randn(1, tokens, 4 * HIDDEN + 3 * HIDDEN, device="cuda", dtype=torch.bfloat16,
                                generator=generator)  # fmt: skip
            prefix = None
            if prefix_width:
                prefix = torch.randn(1, tokens, prefix_width, device="cuda", dtype=torch.bfloat16, generator=generator)
            inputs.append((prefix, fused[..., 3 * HIDDEN :]))
        variants = [("fp8 kernel (fused)", gelu_concat_fp8), ("inductor (gelu, cat, quantiser)", unfused)]
        if baseline is not None:
            variants.insert(1, ("baseline fp8 kernel (--baseline)", baseline.gelu_concat_fp8_fwd))
        for label, fn in variants:
            rows.append(time_variant(op, tokens, label, [functools.partial(fn, *args) for args in inputs]))
        if baseline is not None:
            new, old = gelu_concat_fp8(*inputs[0]), baseline.gelu_concat_fp8_fwd(*inputs[0])
            rows[-1]["codes_differ_from_baseline"] = (new[0].float() != old[0].float()).float().mean().item()
            rows[-1]["scale_max_rel_diff_from_baseline"] = ((new[1] - old[1]).abs() / old[1]).max().item()
            log(f"  kernel vs baseline: {rows[-1]['codes_differ_from_baseline']:.2e} of the codes differ, scales "
                f"{rows[-1]['scale_max_rel_diff_from_baseline']:.2e} (largest relative)")  # fmt: skip
    return rows


def time_variant(op: str, tokens: int, label: str, calls: list) -> dict:
    row = {"op": op, "tokens": tokens, "variant": label}
    try:
        for call in calls:
            call()  # autotune / compile outside the timing
        torch.cuda.synchronize()
        times = gpu_ms(calls)
    except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others
        row.update(us=float("nan"), error=f"{type(err).__name__}: {err}"[:500])
    else:
        row.update(us=times["median"] * 1e3, p20_us=times["p20"] * 1e3, p80_us=times["p80"] * 1e3)
    log(f"  {op:36s} L={tokens:5d} {label:34s} {row['us']:8.1f} us {row.get('error', '')}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, help="another kernels/gelu_fp8.py to time beside this one")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gelu_fp8 needs a CUDA GPU")
    baseline = None if args.baseline is None else load_baseline(args.baseline)
    rows = [row for tokens in TOKENS for row in gelu_rows(tokens, baseline)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment_info(torch.device("cuda")), "rows": rows}, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
