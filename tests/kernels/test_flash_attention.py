"""flash_attention (kernels/flash_attention.py) against attention_ref, under the house tolerance rule.

On a machine without CUDA these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from kernel_tolerance import assert_within_pytorch_error, full_fp32_matmul

import flux_kernels
from flux_kernels import flash_attention as attention_module
from flux_kernels.flash_attention import _config, attention_ref, flash_attention, flash_attention_fwd

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


def make_qkv(batch, heads, q_len, k_len, head_dim, dtype, device, layout="bhld", seed=0):
    """Random q, k, v in one of the layouts callers hand over:
    bhld: contiguous [B, H, L, D]; blhd: [B, L, H, D] memory seen through transpose(1, 2);
    fused: q, k, v as views into one [B, L, 3, H, D] projection output (needs q_len == k_len)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if layout == "bhld":
        return (
            randn(batch, heads, q_len, head_dim),
            randn(batch, heads, k_len, head_dim),
            randn(batch, heads, k_len, head_dim),
        )
    if layout == "blhd":
        return (
            randn(batch, q_len, heads, head_dim).transpose(1, 2),
            randn(batch, k_len, heads, head_dim).transpose(1, 2),
            randn(batch, k_len, heads, head_dim).transpose(1, 2),
        )
    assert layout == "fused" and q_len == k_len
    qkv = randn(batch, q_len, 3, heads, head_dim)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


def attention_refs(q, k, v, softmax_scale=None):
    """(fp32 reference, same-dtype reference), one head at a time to bound the scores' memory."""
    fp32, same = [], []
    with full_fp32_matmul():
        for head in range(q.shape[1]):
            qh, kh, vh = (x[:, head : head + 1] for x in (q, k, v))
            fp32.append(attention_ref(qh, kh, vh, softmax_scale, upcast=True))
            same.append(attention_ref(qh, kh, vh, softmax_scale, upcast=False))
    return torch.cat(fp32, dim=1), torch.cat(same, dim=1)


def check_attention(q, k, v, softmax_scale=None, config=None):
    if config is None:
        out = flash_attention(q, k, v, softmax_scale)
    else:
        out = flash_attention_fwd(q, k, v, softmax_scale, config=config)
    batch, heads, q_len, head_dim = q.shape
    assert out.shape == (batch, heads, q_len, head_dim) and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous(), f"output memory must be [B, Lq, H, D]; strides {out.stride()}"
    reference_fp32, reference_same = attention_refs(q, k, v, softmax_scale)
    assert_within_pytorch_error(out, reference_fp32, reference_same, name="attention")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch, heads, q_len, k_len, head_dim",
    [
        (1, 1, 1, 1, 64),  # single token: the output is v
        (2, 3, 77, 77, 128),  # text length, tails in both dims
        (1, 2, 300, 300, 64),
        (1, 1, 129, 257, 128),  # Lq != Lk, one past a block multiple
        (2, 1, 257, 33, 64),
    ],
)
def test_matches_reference(batch, heads, q_len, k_len, head_dim, dtype, device):
    check_attention(*make_qkv(batch, heads, q_len, k_len, head_dim, dtype, device))


def test_forced_config_from_the_environment(monkeypatch, device):
    from flux_kernels.flash_attention import FORCED_CONFIG_ENV

    # a small tile (the gate self-test's "deliberately poor" one on a GPU) still computes the same attention
    monkeypatch.setenv(FORCED_CONFIG_ENV, "32,32,4,1")
    check_attention(*make_qkv(1, 2, 77, 77, 64, torch.bfloat16, device))
    monkeypatch.setenv(FORCED_CONFIG_ENV, "fast")
    q, k, v = make_qkv(1, 1, 16, 16, 64, torch.bfloat16, device)[:3]
    with pytest.raises(ValueError, match="is not 'BLOCK_M,BLOCK_N,warps,stages'"):
        flash_attention_fwd(q, k, v)


@pytest.mark.parametrize("layout", ["blhd", "fused"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_strided_inputs_without_copies(layout, head_dim, device):
    check_attention(*make_qkv(2, 3, 97, 97, head_dim, torch.bfloat16, device, layout=layout))


def test_softmax_scale(device):
    q, k, v = make_qkv(1, 2, 65, 100, 64, torch.float16, device)
    out = check_attention(q, k, v, softmax_scale=0.3)
    default = flash_attention(q, k, v)
    assert (out.float() - default.float()).abs().max() > 1e-2, "softmax_scale was ignored"


def test_misaligned_view_is_copied_not_misread(device):
    # an odd element offset breaks TMA's 16-byte alignment; the launcher must copy, not read garbage
    buffer = torch.randn(1, 2, 50 * 64 + 1, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    q = buffer[..., 1:].view(1, 2, 50, 64)
    assert q.data_ptr() % 16 != 0
    check_attention(q, q, q)


# Interpreter-sized tiles, both BLOCK_M > BLOCK_N and the reverse, at key lengths with no full block, exactly
# one, and several plus a masked tail.
TILES = {"32x16": _config(32, 16, 4, 1), "16x32": _config(16, 32, 4, 1)}


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("k_len", [5, 16, 32, 83])
def test_key_block_counts(tile, k_len, device):
    check_attention(*make_qkv(1, 2, 37, k_len, 64, torch.bfloat16, device, seed=k_len), config=TILES[tile])


@pytest.mark.parametrize("tile", TILES)
def test_running_max_jumps(tile, device):
    """Key blocks whose scores grow along the sequence, by small steps and by huge ones (the running max of a row
    jumps by up to ~140 in log2 units), so the accumulator's rescaling runs with factors from ~1 to underflow."""
    q, k, v = make_qkv(1, 2, 40, 96, 64, torch.float16, device, seed=7)
    growth = torch.tensor([0.2, 0.5, 1.0, 3.0, 3.2, 9.0], device=device).repeat_interleave(16)  # [96]
    k = (k.float() * growth[None, None, :, None]).to(k.dtype)
    check_attention(q, k, v, softmax_scale=0.4, config=TILES[tile])


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), r"head_dim 48 .*\(64, 128\)"),
        (lambda q, k, v: (q.float(), k.float(), v.float()), r"torch\.float32.*bfloat16"),
        (lambda q, k, v: (q, k[:, :, :5], v), r"k has shape .* but v has"),
        (lambda q, k, v: (q, k[:1], v[:1]), r"B, H and D must match"),
        (lambda q, k, v: (q[0], k[0], v[0]), r"expected 4 dims"),
        (lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v), r"stride .* must be 1"),
        (lambda q, k, v: (q, k, v.half()), r"one dtype"),
    ],
    ids=["head_dim", "fp32", "k_v_mismatch", "batch_mismatch", "3d", "last_stride", "mixed_dtype"],
)
def test_bad_inputs_raise_value_error(change, message, device):
    q, k, v = make_qkv(2, 2, 16, 16, 64, torch.bfloat16, device)
    with pytest.raises(ValueError, match=message):
        flash_attention(*change(q, k, v))


def test_bad_softmax_scale(device):
    q, k, v = make_qkv(1, 1, 8, 8, 64, torch.bfloat16, device)
    with pytest.raises(ValueError, match="softmax_scale -1.0"):
        flash_attention(q, k, v, -1.0)


def test_cpu_without_interpreter_raises_runtime_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not flux_kernels.triton_runnable("cpu")
    q, k, v = make_qkv(1, 1, 8, 8, 64, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="CUDA GPU or the Triton interpreter"):
        flash_attention(q, k, v)


def test_triton_runnable():
    assert flux_kernels.triton_runnable("cuda") == torch.cuda.is_available()
    assert flux_kernels.triton_runnable("cpu") == flux_kernels.triton_interpreting()
    assert not flux_kernels.triton_runnable("meta")


# ----------------------------------------------------------------------------- torch.compile / custom op


def test_eager_call_skips_the_custom_op(monkeypatch, device):
    # the op dispatch costs ~10-20 us a call: eagerly, the public function must launch directly
    def refuse(*args, **kwargs):
        raise AssertionError("eager flash_attention went through the custom op")

    monkeypatch.setattr(attention_module, "_flash_attention_op", refuse)
    check_attention(*make_qkv(1, 1, 8, 8, 64, torch.bfloat16, device))


def test_custom_op_registration(device):
    q, k, v = make_qkv(1, 2, 40, 40, 64, torch.bfloat16, device, layout="fused")
    torch.library.opcheck(torch.ops.flux_kernels.flash_attention.default, (q, k, v))


def test_compiles_fullgraph_without_breaks(device):
    torch._dynamo.reset()

    def attend(qkv):  # qkv: [B, L, 3, H, D] -> [B, L, H * D], the engine's use
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        out = flash_attention(q, k, v)
        batch, heads, tokens, head_dim = out.shape
        return out.transpose(1, 2).view(batch, tokens, heads * head_dim)  # view: needs the fake's strides

    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    qkv = torch.randn(2, 33, 3, 2, 64, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    torch.testing.assert_close(compiled(qkv), attend(qkv), rtol=0, atol=0)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


# ----------------------------------------------------------------------------- compiler (no GPU needed)

# Compiles every Hopper config of the attention kernel for sm90: front end, MLIR passes and ptxas, as on an H100.
SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from flux_kernels import flash_attention as attention

kernel = attention._flash_attention_fwd_kernel.fn
constexprs = {"HEAD_DIM", "BLOCK_M", "BLOCK_N"}
pointers = {"Q", "K", "V", "Out"}
signature = {
    name: "constexpr" if name in constexprs else "*bf16" if name in pointers else "fp32" if name == "softmax_scale"
    else "i32"
    for name in kernel.arg_names
}
for config in attention._HOPPER_CONFIGS:
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs={"HEAD_DIM": 128, **config.kwargs})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
"""


def test_hopper_configs_compile_for_sm90():
    """The interpreter runs none of Triton's compiler, so a kernel can pass every CPU test and still fail to
    compile (a non-constexpr global did once, on the H100). Triton's bundled ptxas compiles for sm90 here."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is missing")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


# ----------------------------------------------------------------------------- real FLUX shapes (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4608, 16896], ids=["1024px", "2048px"])
@pytest.mark.parametrize("layout", ["bhld", "fused"])
def test_flux_shapes(tokens, layout, device):
    # FLUX: 24 heads of 128; 512 text + 4096 / 16384 image tokens
    check_attention(*make_qkv(1, 24, tokens, tokens, 128, torch.bfloat16, device, layout=layout))


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(attention_module._HOPPER_CONFIGS)))
def test_every_hopper_config(index, device):
    # the autotuner may pick any of them: each must compile and be right at the FLUX 1024^2 shape
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        pytest.skip("Hopper/Blackwell configs")
    config = attention_module._HOPPER_CONFIGS[index]
    check_attention(*make_qkv(1, 24, 4608, 4608, 128, torch.bfloat16, device), config=config)
