"""flux_kernels.tuning: a key is tuned once per card and size class, kept in a table, and read back by a later
process; stale or damaged tables cost only tuning again. Runs a two-config kernel under the interpreter (on the
GPU, compiled) with a wall-clock benchmark standing in for Triton's CUDA-event one, which needs a GPU."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from flux_kernels import tuning
from flux_kernels.tuning import TunedLaunch, token_bucket

TIMED = []  # one entry per config the autotuner timed


def _wall_clock_bench(fn, quantiles=None, **_):
    start = time.perf_counter()
    fn()
    TIMED.append(1)
    elapsed = (time.perf_counter() - start) * 1e3
    return [elapsed, elapsed, elapsed]


def _make_kernel():
    """A fresh autotuned kernel each time: a new process's view of the same kernel (same name, no memory)."""

    @triton.autotune(
        configs=[triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)],
        key=["n"],
        do_bench=_wall_clock_bench,
    )
    @triton.jit
    def _add_one_kernel(X, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offsets, tl.load(X + offsets, mask=offsets < n) + 1, mask=offsets < n)

    return _add_one_kernel


def _add_one(launch: TunedLaunch, n: int, device) -> torch.Tensor:
    x = torch.zeros(n + 8, device=device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    launch((n, x.dtype), grid, x, n)
    return x


@pytest.fixture
def tables(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUX_KERNELS_TUNING", raising=False)
    tuning.set_tuning_directory(tmp_path / "tuning")
    TIMED.clear()
    yield tmp_path / "tuning"
    tuning.set_tuning_directory(None)


def _ran_once_each(x: torch.Tensor, n: int) -> bool:
    # the autotuner's timing runs add 1 again per run: only the launch after tuning is counted here when
    # nothing was timed
    return bool((x[:n] >= 1).all() and (x[n:] == 0).all())


def test_token_bucket_is_the_next_power_of_two_from_256():
    sizes = {1: 256, 256: 256, 257: 512, 4080: 4096, 4096: 4096, 4608: 8192, 8704: 16384, 16896: 32768}
    assert {tokens: token_bucket(tokens) for tokens in sizes} == sizes


def test_a_size_class_is_tuned_once_and_its_neighbours_reuse_the_choice(tables, device):
    launch = TunedLaunch(_make_kernel(), tokens=(0,))
    x = _add_one(launch, 70, device)  # 70 tokens: class 256
    assert len(TIMED) == 2 and _ran_once_each(x, 70)
    TIMED.clear()
    x = _add_one(launch, 200, device)  # same class: no timing, one launch
    assert TIMED == [] and (x[:200] == 1).all() and (x[200:] == 0).all()
    _add_one(launch, 300, device)  # class 512: timed
    assert len(TIMED) == 2


def test_a_later_process_reads_the_choice_instead_of_tuning(tables, device):
    first = TunedLaunch(_make_kernel(), tokens=(0,))
    _add_one(first, 100, device)
    chosen = first.chosen[(100, torch.float32)]
    saved = json.loads((tables / f"{tuning.card_name(torch.device(device))}.json").read_text())
    assert list(saved["kernels"]["_add_one_kernel"]) == ["256|torch.float32"]

    tuning.set_tuning_directory(tables)  # forget the tables in memory, as a new process starts without them
    TIMED.clear()
    later = TunedLaunch(_make_kernel(), tokens=(0,))
    x = _add_one(later, 130, device)
    assert TIMED == [] and (x[:130] == 1).all()
    assert later.chosen[(130, torch.float32)] == chosen


def test_a_choice_of_a_config_the_kernel_no_longer_has_is_tuned_again(tables, device):
    card = tuning.card_name(torch.device(device))
    tables.mkdir(parents=True)
    stale = {"_add_one_kernel": {"256|torch.float32": {"BLOCK": 64, "num_warps": 1, "num_stages": 3, "num_ctas": 1}}}
    (tables / f"{card}.json").write_text(json.dumps({"kernels": stale}))
    x = _add_one(TunedLaunch(_make_kernel(), tokens=(0,)), 100, device)
    assert len(TIMED) == 2 and _ran_once_each(x, 100)


def test_a_damaged_table_is_ignored_with_a_warning(tables, device, caplog):
    tables.mkdir(parents=True)
    (tables / f"{tuning.card_name(torch.device(device))}.json").write_text('{"kernels": {"_add_one')
    x = _add_one(TunedLaunch(_make_kernel(), tokens=(0,)), 100, device)
    assert len(TIMED) == 2 and _ran_once_each(x, 100)
    assert "unreadable kernel tuning table" in caplog.text
    json.loads((tables / f"{tuning.card_name(torch.device(device))}.json").read_text())  # rewritten whole


def test_an_unwritable_folder_costs_a_warning_not_the_launch(tmp_path, device, caplog, monkeypatch):
    monkeypatch.delenv("FLUX_KERNELS_TUNING", raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tuning.set_tuning_directory(blocker / "tuning")  # a folder inside a file cannot be made
    try:
        x = _add_one(TunedLaunch(_make_kernel(), tokens=(0,)), 100, device)
    finally:
        tuning.set_tuning_directory(None)
    assert _ran_once_each(x, 100)
    assert "could not keep the kernel tuning choice" in caplog.text


def test_per_process_mode_tunes_every_exact_key_and_keeps_nothing(tables, device, monkeypatch):
    monkeypatch.setenv("FLUX_KERNELS_TUNING", "per-process")
    launch = TunedLaunch(_make_kernel(), tokens=(0,))
    _add_one(launch, 100, device)
    _add_one(launch, 130, device)
    assert len(TIMED) == 4
    assert not tables.exists()


def test_retune_mode_times_again_and_keeps_its_choices(tables, device, monkeypatch):
    _add_one(TunedLaunch(_make_kernel(), tokens=(0,)), 100, device)
    monkeypatch.setenv("FLUX_KERNELS_TUNING", "retune")
    tuning.set_tuning_directory(tables)
    TIMED.clear()
    launch = TunedLaunch(_make_kernel(), tokens=(0,))
    _add_one(launch, 100, device)
    _add_one(launch, 120, device)  # its size class, tuned just now
    assert len(TIMED) == 2
    saved = json.loads((tables / f"{tuning.card_name(torch.device(device))}.json").read_text())
    assert saved["kernels"]["_add_one_kernel"]["256|torch.float32"] == tuning.config_identity(
        launch.autotuned.best_config
    )


def test_an_unknown_mode_names_the_valid_ones(tables, device, monkeypatch):
    monkeypatch.setenv("FLUX_KERNELS_TUNING", "never")
    with pytest.raises(ValueError, match=r"FLUX_KERNELS_TUNING='never'.*valid: tables, retune, per-process"):
        _add_one(TunedLaunch(_make_kernel(), tokens=(0,)), 100, device)


CHECK_SHIPPED = """
import json, sys
from pathlib import Path
import flux_kernels.flash_attention, flux_kernels.fp8_attention, flux_kernels.layernorm_modulate
import flux_kernels.qk_norm_rope
from flux_kernels.tuning import SHIPPED, config_identity
launches = {}
for module in (flux_kernels.flash_attention, flux_kernels.fp8_attention, flux_kernels.layernorm_modulate,
               flux_kernels.qk_norm_rope):
    for value in vars(module).values():
        if type(value).__name__ == "TunedLaunch":
            launches[value.name] = value
problems = []
for path in sorted(SHIPPED.glob("*.json")):
    table = json.loads(path.read_text())
    for kernel, choices in table["kernels"].items():
        if kernel not in launches:
            problems.append(f"{path.name}: no kernel {kernel}")
            continue
        known = [config_identity(c) for c in launches[kernel].autotuned.configs]
        problems += [f"{path.name}: {kernel} {key}: {c} is no config" for key, c in choices.items() if c not in known]
print(json.dumps({"tables": len(list(SHIPPED.glob("*.json"))), "problems": problems}))
"""


def test_every_shipped_choice_is_one_of_its_kernels_configs():
    # the GPU config lists exist only outside the interpreter (a process of its own without TRITON_INTERPRET);
    # a config list edited without a new table would make that card tune again, silently slower to start
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHECK_SHIPPED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    assert report["tables"] == len(list(Path(tuning.SHIPPED).glob("*.json")))


def test_an_engine_cache_directory_holds_the_tuning_tables_too(tmp_path, tiny_components):
    from diffusers import FluxPipeline

    from engine import optimize
    from engine.config import CacheConfig, EngineConfig

    try:
        optimize(FluxPipeline(**tiny_components), EngineConfig(cache=CacheConfig(directory=str(tmp_path))))
        assert tuning.tuning_directory() == tmp_path / "kernel-tuning"
    finally:
        tuning.set_tuning_directory(None)
