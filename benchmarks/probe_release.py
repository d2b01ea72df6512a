"""GPU probe: is an optimised pipeline's transformer freed once the pipeline is dropped (`del pipe`, a collection,
`torch._dynamo.reset()`)? On the H200 the cuDNN preset's 1024^2 peak read 33.0 GiB in the bench after another
preset had run (21.9 alone and in other runs): 11.16 GiB, the fp8 transformer's weights, still allocated. A CPU
shows no leak for the presets it runs (no CUDA graphs there). For each GPU preset on the tiny model: whether the
transformer outlives its pipeline, and if so what holds it (referrers, three levels).

    OUT=results python -m benchmarks.probe_release   # writes $OUT/probe-release.json
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref

import torch

from engine import FluxEngine

PRESETS = ("fp8-compile-fastacc-cudagraphs", "fp8-compile-fastacc-cudagraphs-cudnnattn",
           "fp8-compile-fastacc-cudagraphs-fbcache", "fp8-compile-fastacc-cudagraphs-taylorseer",
           "kernels-compile-cudagraphs", "fp8-compile-fastacc")  # fmt: skip


def _describe(holder, target) -> str:
    if isinstance(holder, dict):
        keys = [str(key) for key, value in holder.items() if value is target][:2]
        return f"dict[{','.join(keys)}]"
    return type(holder).__qualname__


def _holders(target, depth: int, seen: set, skip: set) -> list:
    if depth == 0:
        return []
    found = []
    for holder in gc.get_referrers(target):
        if id(holder) in seen or id(holder) in skip or type(holder).__name__ == "frame":
            continue
        seen.add(id(holder))
        found.append({"holder": _describe(holder, target), "by": _holders(holder, depth - 1, seen, skip)[:6]})
    return found[:8]


def probe(preset: str) -> dict:
    engine = FluxEngine.from_pretrained("synthetic:tiny", preset, device="cuda")
    engine.set_progress_bar_config(disable=True)
    for _ in range(3):  # the third call replays captured graphs
        engine("a red fox", height=256, width=256, num_inference_steps=2, max_sequence_length=32)
    ref = weakref.ref(engine.transformer)
    del engine
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    transformer = ref()
    result = {"preset": preset, "alive": transformer is not None}
    if transformer is not None:
        result["held_by"] = _holders(transformer, 3, set(), {id(sys._getframe().f_locals)})
    del transformer
    return result


def main() -> None:
    results = []
    for preset in PRESETS:
        try:
            results.append(probe(preset))
        except Exception as err:  # noqa: BLE001 - record and go on with the next preset
            results.append({"preset": preset, "error": f"{type(err).__name__}: {err}"[:500]})
        print(json.dumps(results[-1])[:1500], flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "probe-release.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    print("\npreset | transformer freed")
    for result in results:
        print(f"{result['preset']} | {'error' if 'error' in result else not result['alive']}")


if __name__ == "__main__":
    main()
