"""The row-wise Triton kernels (norms with and without fp8 outputs, GELU->fp8, QK-norm+RoPE) compile for an H100
(sm_90) on this machine, no GPU needed: Triton's own compiler
and the ptxas it ships, ahead of time (tests/kernels/sm90_compile.py, in a fresh process without the interpreter). The
interpreter that runs the kernels in the other CPU tests accepts code the compiler refuses (a plain global inside a
jit function failed only on the GPU, 2026-11-26 21:51 UTC), so this is the CPU check that what those tests ran
also compiles, to what the kernels claim: fp8 conversions that round to nearest even, NaN-propagating clamps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flux_kernels.fp8_lora_gemm import GPU_CONFIGS

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (it ships ptxas)")

SCRIPT = Path(__file__).with_name("sm90_compile.py")


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.fail(f"sm90_compile.py failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_case_compiles_to_a_cubin(compiled):
    # the GELU (with a scaled e4m3 prefix too) + qk_norm_rope int8, e4m3 and grouped, the fp8 attention's Hopper
    # configs, its Gluon core (two tiles), its quantisers, the GroupNorm's kernels (moments with and without an input
    # bias, both applies with and without SiLU), the residual add in both layouts, the nearest upsampling, the fp8
    # LoRA GEMM's six configs and its persistent kernel, each with and without its update, and both with the update's
    # operands loaded before the K loop
    assert len(compiled) == 9 + 3 + 5 + 2 + 2 + 7 + 2 + 1 + 16
    failed = {name: case.get("error") for name, case in compiled.items() if not case["compiled"]}
    assert not failed, failed


def test_fp8_outputs_round_to_nearest_even_and_keep_nan(compiled):
    fp8 = {name: case for name, case in compiled.items() if name.startswith(("gelu", "layernorm", "gated")) and
           "fp8=False" not in name}  # fmt: skip
    fp8["qk_norm_rope/e4m3"] = compiled["qk_norm_rope/e4m3"]
    assert len(fp8) == 6
    for name, case in fp8.items():
        assert case["rne_fp8_cast"], f"{name}: no cvt.rn.satfinite e4m3 conversion in the PTX"
        assert case["nan_clamp"], f"{name}: the clamp does not propagate NaN"


def test_the_gelu_divides_approximately_on_the_gpu(compiled):
    """The GELU's division is div.approx (3 fewer SASS instructions a value than "/": the kernel is issue-bound,
    benchmarks/NOTES.md 2026-11-30 21:44); the interpreter, without libdevice, divides with "/"."""
    for name in ("gelu_concat_fp8/prefix=True", "gelu_concat_fp8/prefix=False", "gelu_concat_fp8/scaled_prefix"):
        assert compiled[name]["approx_divide"]


def test_qk_norm_rope_stores_16_byte_vectors_in_both_layouts(compiled):
    """The grouped (Ulysses) layout's runtime strides keep the default layout's stores: q, k and v leave in 16-byte
    vectors (st.global.v4), none element by element, given the alignment the runtime specialises on; so does the
    e4m3 path's v, its heads read in three blocks of 8."""
    for name in ("qk_norm_rope/txt=True", "qk_norm_rope/txt=False", "qk_norm_rope/grouped", "qk_norm_rope/e4m3"):
        stores = compiled[name]["stores"]
        assert stores["st.global.v4"] > 0 and stores["st.global.b16"] == 0, f"{name}: {stores}"
    assert compiled["qk_norm_rope/grouped"]["stores"] == compiled["qk_norm_rope/txt=True"]["stores"]


def test_the_vae_copies_and_sums_store_16_byte_vectors(compiled):
    """The residual add and the nearest upsampling are pure bandwidth: their stores leave in 16-byte vectors
    (st.global.v4; 8 bf16 values), none value by value, given the alignment the runtime specialises on."""
    for name in ("residual_add/channels_last=True", "residual_add/channels_last=False", "upsample_nearest/2x"):
        stores = compiled[name]["stores"]
        assert stores["st.global.v4"] > 0 and stores["st.global.b16"] == 0, f"{name}: {stores}"


def test_quantised_attention_runs_on_int8_and_fp8_tensor_cores(compiled):
    """Every Hopper config's QK^T is an int8 wgmma and its PV an e4m3 one (no silent upcast to bf16 MMAs)."""
    attention = {name: case for name, case in compiled.items() if name.startswith("fp8_attention/")}
    assert len(attention) == 5
    for name, case in attention.items():
        kinds = " ".join(case["wgmma"])
        assert ".s8.s8" in kinds and ".e4m3.e4m3" in kinds, f"{name}: {case['wgmma']}"


def test_the_gluon_attention_core_overlaps_the_softmax_with_an_mma(compiled):
    """The Gluon core (kernels/fp8_attention_gluon.py) runs int8 and e4m3 wgmmas, and waits for S_j with one MMA
    still in flight (`wgmma.wait_group 1`: P_{j-1} V_{j-1} runs beside the softmax), which is why it exists: the
    Triton kernel only ever waits for all of them (`wait_group 0`)."""
    gluon = {name: case for name, case in compiled.items() if name.startswith("fp8_attention_gluon/")}
    assert len(gluon) == 2
    for name, case in gluon.items():
        kinds = " ".join(case["wgmma"])
        assert ".s8.s8" in kinds and ".e4m3.e4m3" in kinds, f"{name}: {case['wgmma']}"
        assert case["wgmma_waits"] == ["0", "1"], f"{name}: waits {case['wgmma_waits']}"
    triton_core = {name: case for name, case in compiled.items() if name.startswith("fp8_attention/")}
    assert all(case["wgmma_waits"] == ["0"] for case in triton_core.values())


def test_the_lora_gemm_runs_its_base_on_fp8_and_its_update_on_bf16_tensor_cores(compiled):
    """Every config of fp8_lora_gemm: the K loop an e4m3 wgmma; with the LoRA epilogue a bf16 wgmma as well."""
    cases = {name: case for name, case in compiled.items() if name.startswith("fp8_lora_gemm/")}
    assert len(cases) == 16
    for name, case in cases.items():
        kinds = " ".join(case["wgmma"])
        assert ".e4m3.e4m3" in kinds, f"{name}: {case['wgmma']}"
        assert (".bf16.bf16" in kinds) == ("lora=True" in name), f"{name}: {case['wgmma']}"


def test_the_lora_gemm_loads_its_update_in_16_byte_vectors(compiled):
    """The update's operands (LOW's rows at a column read from LOW_COL, UP's rows) load as 16-byte vectors: without
    the kernel saying that column is a multiple of the rank, LOW's [BLOCK_M, 64] loaded one bf16 at a time (32 loads a
    thread a tile, where 4 do). Each config with its update adds vector loads and no scalar ones."""
    for config in GPU_CONFIGS:
        blocks, threads = config.kwargs, 32 * config.num_warps
        tile = f"{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']}/s{config.num_stages}w{config.num_warps}"
        with_update, without = compiled[f"fp8_lora_gemm/{tile}/lora=True"], compiled[f"fp8_lora_gemm/{tile}/lora=False"]
        vectors = (blocks["BLOCK_M"] + blocks["BLOCK_N"]) * 64 * 2 // 16 // threads  # rank 64, bf16
        assert with_update["vector_loads"] - without["vector_loads"] >= vectors, tile
        assert with_update["scalar_b16_loads"] == without["scalar_b16_loads"], tile


def test_the_lora_gemm_can_load_its_update_before_its_k_loop(compiled):
    """prefetch_lora: the update's loads come before the first MMA (in flight during the K loop); by default none do."""
    config = GPU_CONFIGS[0]
    blocks = config.kwargs
    tile = f"{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']}/s{config.num_stages}w{config.num_warps}"
    after, before = compiled[f"fp8_lora_gemm/{tile}/lora=True"], compiled[f"fp8_lora_gemm/{tile}/lora=True/prefetch"]
    assert after["global_loads_before_first_mma"] == 0
    assert before["global_loads_before_first_mma"] >= before["vector_loads"] > 0


