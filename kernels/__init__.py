"""Triton kernels of flux-engine, one op per module, each with a plain PyTorch reference beside it.

The repository folder is `kernels/`; the installed package is `flux_kernels` (pyproject.toml maps the one to the
other), because the import name `kernels` belongs to Hugging Face's `kernels` distribution, which bitsandbytes and
diffusers import.

    flux_kernels.flash_attention     flash_attention (+ attention_ref)
    flux_kernels.fp8_attention       fp8_attention: QK^T in int8, PV in e4m3 (quantisers, + fp8_attention_ref)
    flux_kernels.qk_norm_rope        qk_norm_rope: q/k RMSNorm + rotary + [text, image] concat + head-major layout
                                     (+ qk_norm_rope_ref); qk_norm_rope_int8 writes q, k as int8 + scales
    flux_kernels.layernorm_modulate  layernorm_modulate, gated_residual_layernorm_modulate, both also with fp8
                                     outputs for an fp8 GEMM (*_fp8) (+ *_ref)
    flux_kernels.gelu_fp8            gelu_concat_fp8: an MLP's tanh GELU (after an optional copied prefix) quantised
                                     per token to e4m3 for the fp8 projection after it (+ _ref)
    flux_kernels.group_norm          group_norm: GroupNorm with split statistics (+ a convolution's bias in, SiLU out)
    flux_kernels.residual_add        residual_add: (shortcut + h + bias[c]) / divisor, a VAE ResnetBlock2D's end
    flux_kernels.upsample_nearest    upsample_nearest2x: nearest 2x upsampling of channels_last images
    flux_kernels.fp8                 quantize_fp8_rowwise: the per-row e4m3 quantiser (plain PyTorch), the *_fp8
                                     ops' reference; e4m3_scale / e4m3: its arithmetic as Triton functions;
                                     quantize_int8_ref / int8_codes: the same for symmetric int8
    flux_kernels.rowwise             what the row-wise ops share: input checks, autotune configs, dtypes
    flux_kernels.tuning              TunedLaunch: autotuned launches that tune once per card and size class
                                     (tables shipped in tuned/, and this machine's own)

Importing a submodule registers its ops as `torch.ops.flux_kernels.*` custom ops; this package itself
imports none of them, so `import flux_kernels` stays cheap. Nothing here imports `engine`.

Triton decides between compiled and interpreted kernels when a kernel is decorated: to run the kernels on
CPU tensors, set TRITON_INTERPRET=1 before the first import of a kernel module.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Test hook: when True, every output a launcher allocates starts filled with NaN (or the dtype's max for
# integer outputs), so an element the kernel forgets to write fails the comparison instead of passing on
# whatever the allocator left there. Costs one extra write per output; leave off outside tests.
POISON_OUTPUTS = False


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1), i.e. on CPU tensors."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def triton_runnable(device: torch.device | str) -> bool:
    """Whether this package's Triton kernels can run on tensors of `device`.

    CUDA devices: when PyTorch sees a GPU. CPU: only under the Triton interpreter (TRITON_INTERPRET=1,
    set before the kernel modules were imported).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return triton_interpreting()
    return False


def check_runnable(device: torch.device, op: str) -> None:
    """Raise a RuntimeError that says how to run `op` when Triton cannot run on `device`."""
    if device.type == "cuda":  # a CUDA tensor exists, so the GPU is there: the per-call fast path
        return
    if triton_runnable(device):
        if device.type == "cpu" and not _INTERPRETER_FIXES:
            raise RuntimeError(
                f"{op}: CPU tensors run in Triton's interpreter, whose bugs make these kernels wrong (see "
                "interpreter_fixes); run them inside `with flux_kernels.interpreter_fixes():` (the tests do), or use "
                f"the PyTorch reference {op}_ref"
            )
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: got CPU tensors, but Triton kernels need a CUDA GPU or the Triton interpreter; move the "
            "tensors to a GPU, or set TRITON_INTERPRET=1 before importing flux_kernels (slow, for tests), or use "
            f"the PyTorch reference {op}_ref instead"
        )
    raise RuntimeError(f"{op}: Triton kernels cannot run on device {device}; use a CUDA device")


_INTERPRETER_FIXES: list[int] = []  # one entry per active interpreter_fixes() block


@contextlib.contextmanager
def interpreter_fixes():
    """Work around three bugs of Triton's interpreter (3.6 and 3.7) inside the block, and put Triton back as it was
    after it (CPU runs only; compiled kernels never use the interpreter). The kernels refuse CPU tensors outside it.

    1. Scalars are 1-element arrays, turned into Python ints (for `range`) with `int(array)`, which NumPy
       >= 2.4 refuses for ndim > 0: every `tl.range(lo, hi)` with run-time bounds fails. Use `.item()`.
    2. `tl.dot` multiplies bf16 operands as their raw uint16 storage: garbage. Widen bf16 to fp32 first
       (exact), which is what the tensor cores compute with fp32 accumulation.
    3. fp32 -> float8e4nv conversions truncate the mantissa (or, asked for round-to-nearest-even, round half
       up without carrying into the exponent); the GPU rounds to nearest even. Convert with PyTorch's cast,
       which does (whatever rounding mode was asked: our kernels ask for round-to-nearest-even only).
    Blocks may nest; the outermost one patches and restores.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if _INTERPRETER_FIXES:
        _INTERPRETER_FIXES.append(1)
        try:
            yield
        finally:
            _INTERPRETER_FIXES.pop()
        return
    original_patch_tensor = interpreter._patch_lang_tensor
    original_dot = interpreter.InterpreterBuilder.create_dot
    original_convert = interpreter._convert_float

    def patch_lang_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def widen_bf16(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(widened, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen_bf16(a), widen_bf16(b), d, input_precision, max_num_imprecise_acc)

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return original_convert(data, input_dtype, output_dtype, rounding_mode)

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._convert_float = convert_float
    interpreter.InterpreterBuilder.create_dot = create_dot
    _INTERPRETER_FIXES.append(1)
    try:
        yield
    finally:
        _INTERPRETER_FIXES.pop()
        interpreter._patch_lang_tensor = original_patch_tensor
        interpreter._convert_float = original_convert
        interpreter.InterpreterBuilder.create_dot = original_dot


_NO_GUARD = contextlib.nullcontext()


def device_guard(tensor: torch.Tensor):
    """Make `tensor`'s GPU the current one for a launch (Triton launches on the current device). A no-op
    when it already is, the usual case: switching devices costs a few microseconds per call."""
    index = tensor.get_device()  # -1 on the CPU
    if index >= 0 and index != torch.cuda.current_device():
        return torch.cuda.device(index)
    return _NO_GUARD


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """SMs of `device`, for persistent grids; 2 under the interpreter (CPU), so its tests still loop."""
    return _cuda_multiprocessors(device.index if device.index is not None else 0) if device.type == "cuda" else 2


def new_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, poisoned with NaN when POISON_OUTPUTS is on (see above)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).max)
    return out


__all__ = [
    "POISON_OUTPUTS",
    "check_runnable",
    "device_guard",
    "interpreter_fixes",
    "multiprocessor_count",
    "new_output",
    "triton_interpreting",
    "triton_runnable",
]
