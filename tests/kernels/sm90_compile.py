"""Compile the row-wise Triton kernels (the norms with and without fp8 outputs, GELU->fp8, QK-norm+RoPE) for an
H100 (sm_90) ahead of time, no GPU needed (Triton's compiler and
the ptxas it ships). Run by tests/kernels/test_sm90_compile.py in a fresh process without TRITON_INTERPRET (under
the interpreter the kernels are not compilable objects). Prints one JSON object: per case, whether it compiled,
and the PTX facts the test checks."""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
FP8_CAST = "cvt.rn.satfinite.e4m3x2.f32"  # fp32 -> e4m3 with round to nearest even, as torch's cast


def compile_case(kernel, signature: dict, constexprs: dict, num_warps: int, source=ASTSource, attrs=None) -> dict:
    fn = kernel
    while not isinstance(fn, JITFunction):  # an autotuned kernel wraps the jit function
        fn = fn.fn
    try:
        asm = triton.compile(source(fn, signature, constexprs=constexprs, attrs=attrs), target=H100,
                             options={"num_warps": num_warps}).asm  # fmt: skip
    except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
        return {"compiled": False, "error": f"{type(err).__name__}: {err}"[:2000]}
    ptx = asm["ptx"]
    lines = ptx.splitlines()
    first_mma = next((i for i, line in enumerate(lines) if "wgmma.mma_async" in line), len(lines))
    return {"global_loads_before_first_mma": sum("ld.global" in line for line in lines[:first_mma]),
            "vector_loads": sum("ld.global" in line and ".v4." in line for line in lines),
            "scalar_b16_loads": sum("ld.global" in line and ".b16 " in line for line in lines),
            "compiled": bool(asm.get("cubin")), "rne_fp8_cast": FP8_CAST in ptx,
            "nan_clamp": "min.NaN" in ptx or "max.NaN" in ptx, "approx_divide": "div.approx" in ptx,
            "stores": {kind: ptx.count(kind) for kind in ("st.global.v4", "st.global.v2", "st.global.b16")},
            "wgmma": sorted({line.split()[0] for line in ptx.splitlines() if "wgmma.mma_async" in line}),
            "wgmma_waits": sorted({line.split()[1].rstrip(";") for line in ptx.splitlines()
                                   if line.strip().startswith("wgmma.wait_group")})}  # fmt: skip


def cases() -> dict:
    from flux_kernels import layernorm_modulate, qk_norm_rope
    from flux_kernels.gelu_fp8 import _gelu_concat_fp8_kernel

    results = {}
    gelu = {"PREFIX": "*bf16", "X": "*bf16", "OUT": "*fp8e4nv", "OUT_SCALE": "*fp32", "stride_p_b": "i64",
            "stride_p_l": "i64", "stride_x_b": "i64", "stride_x_l": "i64", "L": "i32", "KP": "i32", "K": "i32",
            "HAS_PREFIX": "constexpr", "BLOCK_P": "constexpr", "BLOCK_K": "constexpr",
            "APPROX_DIVIDE": "constexpr", "THIRDS": "constexpr", "PREFIX_SCALE": "*fp32", "stride_ps_b": "i64",
            "SCALED_PREFIX": "constexpr"}  # fmt: skip
    # FLUX's rows: 3072 + 12288 columns, each as three power-of-two chunks; the cuDNN core's e4m3 output as the prefix
    for has_prefix, scaled in ((True, False), (False, False), (True, True)):
        constexprs = {"HAS_PREFIX": has_prefix, "BLOCK_P": 1024, "BLOCK_K": 4096, "APPROX_DIVIDE": True, "THIRDS": True,
                      "SCALED_PREFIX": scaled}  # fmt: skip
        name = "gelu_concat_fp8/scaled_prefix" if scaled else f"gelu_concat_fp8/prefix={has_prefix}"
        signature = {**gelu, "PREFIX": "*fp8e4nv"} if scaled else gelu
        results[name] = compile_case(_gelu_concat_fp8_kernel, signature, constexprs, 16)
    tail = {"B": "i32", "L": "i32", "C": "i32", "eps": "fp32", "BLOCK_C": "constexpr", "BLOCK_ROWS": "constexpr",
            "PROGRAMS_PER_SM": "constexpr", "QUANT_FP8": "constexpr"}  # fmt: skip
    for quant_fp8 in (True, False):
        out = "*fp8e4nv" if quant_fp8 else "*bf16"
        ln = {"X": "*bf16", "SHIFT": "*bf16", "SCALE": "*bf16", "OUT": out, "OUT_SCALE": "*fp32",
              "stride_x_b": "i64", "stride_x_l": "i64", "stride_shift_b": "i64", "stride_scale_b": "i64",
              **tail}  # fmt: skip
        gated = {"X": "*bf16", "Y": "*bf16", "GATE": "*bf16", "SHIFT": "*bf16", "SCALE": "*bf16", "RESIDUAL": "*bf16",
                 "OUT": out, "OUT_SCALE": "*fp32", "stride_x_b": "i64", "stride_x_l": "i64", "stride_y_b": "i64",
                 "stride_y_l": "i64", "stride_gate_b": "i64", "stride_shift_b": "i64", "stride_scale_b": "i64",
                 **tail}  # fmt: skip
        constexprs = {"BLOCK_C": 4096, "BLOCK_ROWS": 1, "PROGRAMS_PER_SM": 0, "QUANT_FP8": quant_fp8}
        results[f"layernorm_modulate/fp8={quant_fp8}"] = compile_case(
            layernorm_modulate._layernorm_modulate_fwd_kernel, ln, constexprs, 4
        )
        results[f"gated_residual_layernorm_modulate/fp8={quant_fp8}"] = compile_case(
            layernorm_modulate._gated_residual_layernorm_modulate_fwd_kernel, gated, constexprs, 4
        )
    qk = {name: "*bf16" for name in ("IMG", "TXT", "Q_W", "K_W", "TXT_Q_W", "TXT_K_W")}
    qk.update({"COS": "*fp32", "SIN": "*fp32", "Q_OUT": "*bf16", "K_OUT": "*bf16", "V_OUT": "*bf16",
               "QS_OUT": "*fp32", "KS_OUT": "*fp32"})  # fmt: skip
    qk.update({name: "i64" for name in ("stride_img_b", "stride_img_l", "stride_txt_b", "stride_txt_l",
                                         "stride_cos_l", "stride_sin_l")})  # fmt: skip
    out_strides = ("stride_out_b", "stride_out_l", "stride_out_group", "stride_out_slice")
    qk.update({name: "i64" for name in out_strides})
    qk.update({"heads_per_group": "i32", "heads_per_slice": "i32", "L_txt": "i32", "L_img": "i32", "H": "i32",
               "eps": "fp32", "HEAD_DIM": "constexpr", "BLOCK_H": "constexpr", "HAS_TXT": "constexpr",
               "BLOCK_T": "constexpr", "INT8_QK": "constexpr", "GROUPED_OUT": "constexpr", "E4M3_QK": "constexpr",
               "E4M3_BOUND": "constexpr", "H_CHUNKS": "constexpr"})  # fmt: skip
    # pointers and output strides 16-aligned, as the runtime specialises them on a GPU (torch's allocations are, and
    # the grouped layout's strides are multiples of D): the facts the stores' vector width depends on
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(qk.items())
               if kind.startswith("*") or name in out_strides}  # fmt: skip
    for has_txt in (True, False):  # FLUX: 24 heads of 128 (a block of 32 heads), one token per program
        constexprs = {"HEAD_DIM": 128, "BLOCK_H": 32, "HAS_TXT": has_txt, "BLOCK_T": 1, "INT8_QK": False,
                      "GROUPED_OUT": False, "E4M3_QK": False, "E4M3_BOUND": 1.0, "H_CHUNKS": 1}  # fmt: skip
        results[f"qk_norm_rope/txt={has_txt}"] = compile_case(
            qk_norm_rope._qk_norm_rope_fwd_kernel, qk, constexprs, 8, attrs=aligned
        )
    constexprs = {"HEAD_DIM": 128, "BLOCK_H": 32, "HAS_TXT": True, "BLOCK_T": 1, "INT8_QK": False, "GROUPED_OUT": True,
                  "E4M3_QK": False, "E4M3_BOUND": 1.0, "H_CHUNKS": 1}  # fmt: skip
    results["qk_norm_rope/grouped"] = compile_case(
        qk_norm_rope._qk_norm_rope_fwd_kernel, qk, constexprs, 8, attrs=aligned
    )
    from flux_kernels import fp8_attention

    qk["Q_OUT"] = qk["K_OUT"] = "*i8"
    constexprs = {"HEAD_DIM": 128, "BLOCK_H": 32, "HAS_TXT": True, "BLOCK_T": 1, "INT8_QK": True, "GROUPED_OUT": False,
                  "E4M3_QK": False, "E4M3_BOUND": 1.0, "H_CHUNKS": 1}  # fmt: skip
    results["qk_norm_rope/int8"] = compile_case(qk_norm_rope._qk_norm_rope_fwd_kernel, qk, constexprs, 8)
    qk["Q_OUT"] = qk["K_OUT"] = "*fp8e4nv"  # e4m3 with static scales (flux_kernels.cudnn_attention)
    # FLUX's 24 heads as three blocks of 8, 4 warps: 8 values of a [1, 8, 128] tile a thread
    constexprs = {**constexprs, "INT8_QK": False, "E4M3_QK": True, "E4M3_BOUND": 128**0.5 * 1.01, "BLOCK_H": 8,
                  "H_CHUNKS": 3}  # fmt: skip
    results["qk_norm_rope/e4m3"] = compile_case(qk_norm_rope._qk_norm_rope_fwd_kernel, qk, constexprs, 4,
                                                attrs=aligned)  # fmt: skip
    strides = [f"stride_{name}" for name in ("qb", "qh", "qm", "kb", "kh", "kn", "vb", "vh", "vd", "qsb", "qsh", "ksb",
                                              "ksh", "vsb", "vsh", "ob", "oh", "om")]  # fmt: skip
    attn = {"Q": "*i8", "QS": "*fp32", "K": "*i8", "KS": "*fp32", "VT": "*fp8e4nv", "VS": "*fp32", "Out": "*bf16",
            "qk_scale": "fp32", **dict.fromkeys(strides, "i32"), "H": "i32", "Lq": "i32", "Lk": "i32",
            "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}  # fmt: skip
    for config in fp8_attention._HOPPER_CONFIGS:
        name = "fp8_attention/{BLOCK_M}x{BLOCK_N}".format(**config.kwargs) + f"/w{config.num_warps}s{config.num_stages}"
        results[name] = compile_case(fp8_attention._fp8_attention_fwd_kernel, attn, {"HEAD_DIM": 128, **config.kwargs},
                                     config.num_warps)  # fmt: skip
    from flux_kernels import fp8_attention_gluon

    if fp8_attention_gluon.GLUON:  # the Gluon core: the runtime's 16-byte divisibility of pointers and row strides
        from triton.experimental.gluon._runtime import GluonASTSource

        gluon_sig = {**attn, "STAGES": "constexpr"}
        aligned = {"stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                   "stride_vh", "stride_vd", "stride_ob", "stride_oh", "stride_om"}  # fmt: skip
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(gluon_sig.items())
                 if kind.startswith("*") or name in aligned}  # fmt: skip
        for block_m, block_n, stages in ((64, 128, 3), (64, 64, 4)):
            results[f"fp8_attention_gluon/{block_m}x{block_n}/s{stages}"] = compile_case(
                fp8_attention_gluon._fp8_attention_gluon_kernel, gluon_sig,
                {"HEAD_DIM": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages}, block_m // 16,
                GluonASTSource, attrs,
            )  # fmt: skip
    quant = {"X": "*bf16", "OUT": "*i8", "SCALE": "*fp32", **dict.fromkeys(
        ("stride_xb", "stride_xh", "stride_xl", "stride_ob", "stride_oh", "stride_ol", "stride_od", "stride_s", "H",
         "L"), "i32"), "HEAD_DIM": "constexpr", "BLOCK_L": "constexpr", "V_E4M3": "constexpr"}  # fmt: skip
    for v_e4m3 in (False, True):
        quant["OUT"] = "*fp8e4nv" if v_e4m3 else "*i8"
        constexprs = {"HEAD_DIM": 128, "BLOCK_L": 32, "V_E4M3": v_e4m3}
        results[f"fp8_attention_quantize/v={v_e4m3}"] = compile_case(
            fp8_attention._quantize_kernel, quant, constexprs, 4
        )
    from flux_kernels import group_norm

    aligned = {(i,): [["tt.divisibility", 16]] for i in range(3)}  # X, INPUT_BIAS, PARTIAL / X, SCALE, SHIFT
    moments = {"X": "*bf16", "INPUT_BIAS": "*bf16", "PARTIAL": "*fp32", "group_size": "i64", "chunks": "i32",
               "spatial": "i32", "groups": "i32", "per_channel": "i32", "CHUNK": "constexpr", "BLOCK": "constexpr",
               "HAS_INPUT_BIAS": "constexpr"}  # fmt: skip
    for has_bias in (False, True):
        sizes = {"CHUNK": group_norm.CHUNK, "BLOCK": group_norm.BLOCK, "HAS_INPUT_BIAS": has_bias}
        results[f"group_norm/moments/input_bias={has_bias}"] = compile_case(
            group_norm._group_moments_kernel, moments, sizes, 4, attrs=aligned
        )
    nhwc = {"X": "*bf16", "PARTIAL": "*fp32", "spatial": "i64", "C": "i32", "chunks": "i32", "LOOPS": "constexpr",
            "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}  # fmt: skip
    results["group_norm/channel_moments"] = compile_case(group_norm._channel_moments_kernel, nhwc,
                                                         {"LOOPS": 16, "BLOCK_P": 16, "BLOCK_C": 128}, 4)  # fmt: skip
    apply_nhwc = {"X": "*bf16", "SCALE": "*fp32", "SHIFT": "*fp32", "OUT": "*bf16", "spatial": "i64", "C": "i32",
                  "blocks": "i64", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr", "SILU": "constexpr"}  # fmt: skip
    apply = {"X": "*bf16", "SCALE": "*fp32", "SHIFT": "*fp32", "OUT": "*bf16", "spatial": "i64", "blocks": "i64",
             "BLOCK": "constexpr", "SILU": "constexpr"}  # fmt: skip
    for silu in (False, True):
        results[f"group_norm/channels_last_apply/silu={silu}"] = compile_case(
            group_norm._channels_last_apply_kernel, apply_nhwc, {"BLOCK_P": 32, "BLOCK_C": 128, "SILU": silu}, 4
        )
        results[f"group_norm/apply/silu={silu}"] = compile_case(
            group_norm._group_norm_apply_kernel, apply, {"BLOCK": group_norm.BLOCK, "SILU": silu}, 4
        )
    from flux_kernels import residual_add, upsample_nearest

    residual = {"H": "*bf16", "SHORTCUT": "*bf16", "BIAS": "*fp32", "OUT": "*bf16", "numel": "i64", "channels": "i32",
                "spatial": "i32", "divisor": "fp32", "BLOCK": "constexpr", "CHANNELS_LAST": "constexpr"}  # fmt: skip
    for channels_last in (False, True):
        results[f"residual_add/channels_last={channels_last}"] = compile_case(
            residual_add._residual_add_fwd_kernel, residual,
            {"BLOCK": residual_add.BLOCK, "CHANNELS_LAST": channels_last}, 4,
            attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4)},  # pointers, numel: as at runtime
        )  # fmt: skip
    upsample = {"X": "*bf16", "OUT": "*bf16", "pixels": "i64", "height": "i32", "width": "i32", "channels": "i32",
                "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}  # fmt: skip
    rows = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 5)}  # X, OUT, channels: as at runtime
    results["upsample_nearest/2x"] = compile_case(upsample_nearest._upsample_nearest2x_fwd_kernel, upsample,
                                                  {"BLOCK_P": 32, "BLOCK_C": 256}, 4, attrs=rows)  # fmt: skip
    from flux_kernels.fp8_lora_gemm import GPU_CONFIGS, _fp8_lora_gemm_fwd_kernel, _fp8_lora_gemm_persistent_kernel

    # as at runtime: the pointers (LOW, UP, OUT) and the strides (multiples of the rank and of 16) divisible by 16
    aligned = {(i,): [["tt.divisibility", 16]] for i in (5, 7, 8, 13, 14, 15)}
    for config in GPU_CONFIGS:  # every config the autotuner may pick, with and without the LoRA epilogue
        blocks = config.kwargs
        lora_gemm = {"x_desc": f"tensordesc<fp8e4nv[{blocks['BLOCK_M']}, {blocks['BLOCK_K']}]>",
                     "w_desc": f"tensordesc<fp8e4nv[{blocks['BLOCK_N']}, {blocks['BLOCK_K']}]>", "X_SCALE": "*fp32",
                     "W_SCALE": "*fp32", "BIAS": "*bf16", "LOW": "*bf16", "LOW_COL": "*i32", "UP": "*bf16",
                     "OUT": "*bf16", "M": "i32", "N": "i32", "K": "i32", "PART_ALIGN": "i32", "stride_low": "i32",
                     "stride_up": "i32", "stride_out": "i32"}  # fmt: skip
        for lora, prefetch in ((True, False), (False, False)) + (((True, True),) if config is GPU_CONFIGS[0] else ()):
            constexprs = {"HAS_BIAS": True, "HAS_LORA": lora, "RANK": 64, "FAST_ACCUM": True, "PROMOTE": 128,
                          "PREFETCH": prefetch, **blocks}  # fmt: skip
            lora_gemm.update(dict.fromkeys(constexprs, "constexpr"))
            tile = (
                f"{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']}/s{config.num_stages}w{config.num_warps}"
            )
            name = f"fp8_lora_gemm/{tile}/lora={lora}" + ("/prefetch" if prefetch else "")
            results[name] = compile_case(_fp8_lora_gemm_fwd_kernel, dict(lora_gemm), constexprs, config.num_warps,
                                         attrs=aligned)  # fmt: skip
    persistent = {**lora_gemm, "PROGRAMS": "i32", "FLATTEN": "constexpr"}  # the last config's tiles, flattened loops
    for lora, prefetch in ((True, False), (False, False), (True, True)):
        constexprs = {"HAS_BIAS": True, "HAS_LORA": lora, "RANK": 64, "FAST_ACCUM": True, "PROMOTE": 128,
                      "PREFETCH": prefetch, **blocks, "FLATTEN": True}  # fmt: skip
        name = f"fp8_lora_gemm/persistent/lora={lora}" + ("/prefetch" if prefetch else "")
        results[name] = compile_case(_fp8_lora_gemm_persistent_kernel, dict(persistent), constexprs, config.num_warps,
                                     attrs=aligned)  # fmt: skip
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    print(json.dumps(cases()))
