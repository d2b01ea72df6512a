"""Test-wide setup.

Triton decides between compiled and interpreted kernels when a kernel is decorated, so the
interpreter switch must be set before anything imports `kernels`: without CUDA every Triton
kernel runs under TRITON_INTERPRET=1 on CPU tensors.
"""

import os
import tempfile

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the kernels' tuning choices (flux_kernels.tuning) of a test run stay out of the user's own tables
os.environ.setdefault("FLUX_KERNELS_TUNING_DIR", tempfile.mkdtemp(prefix="flux-kernels-tuning-"))


@pytest.fixture(scope="session", autouse=True)
def _triton_interpreter_fixes():
    """Without CUDA the kernels run in Triton's interpreter, whose bugs flux_kernels.interpreter_fixes works around
    for the whole session (and undoes after it)."""
    if HAS_CUDA:
        yield
        return
    import flux_kernels

    with flux_kernels.interpreter_fixes():
        yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


TINY_SIZE = 64  # pixels: 4x4 latent patches, the smallest image with a 2x2 patch grid per side


@pytest.fixture(scope="session")
def tiny_components():
    """The tiny synthetic FLUX pipeline's components, fp32 on the CPU, seed 0. Treat as read-only."""
    from engine.models import synthetic_components

    return synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)


def tiny_call_kwargs(**overrides) -> dict:
    """Arguments of a fast, deterministic tiny pipeline call."""
    kwargs = {
        "prompt": "a red fox in the snow",
        "height": TINY_SIZE,
        "width": TINY_SIZE,
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "generator": torch.Generator().manual_seed(0),
        "max_sequence_length": 32,
        "output_type": "pt",
    }
    kwargs.update(overrides)
    return kwargs


def trainer_format_lora(transformer, layout: str, rank: int = 4, seed: int = 0, std: float = 0.15) -> dict:
    """A LoRA state dict for `transformer` in a trainer's own layout, which diffusers converts on loading:
    - "kohya" (sd-scripts): `lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight` / `lora_up` / `alpha`, BFL's
      module names, fused QKV as one factor pair; every double-block projection incl. the adaLN modulation, and the
      single blocks' linear2 and modulation (diffusers splits their linear1 at FLUX.1's widths, which the tiny model
      lacks);
    - "xlabs": `double_blocks.{i}.processor.qkv_lora1.down.weight` / `up`, one down factor shared by q, k and v;
      attention only, the single blocks' q, k, v (three of linear1's four parts) and proj_out."""
    generator = torch.Generator().manual_seed(seed)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    pairs = {}  # key stem -> (in, out)
    for i, block in enumerate(transformer.transformer_blocks):
        mlp = block.ff.net[0].proj.out_features
        if layout == "kohya":
            for side in ("img", "txt"):
                pairs.update({
                    f"lora_unet_double_blocks_{i}_{side}_attn_qkv": (width, 3 * width),
                    f"lora_unet_double_blocks_{i}_{side}_attn_proj": (width, width),
                    f"lora_unet_double_blocks_{i}_{side}_mlp_0": (width, mlp),
                    f"lora_unet_double_blocks_{i}_{side}_mlp_2": (mlp, width),
                    f"lora_unet_double_blocks_{i}_{side}_mod_lin": (width, 6 * width),
                })  # fmt: skip
        else:
            for n in (1, 2):
                pairs[f"double_blocks.{i}.processor.qkv_lora{n}"] = (width, 3 * width)
                pairs[f"double_blocks.{i}.processor.proj_lora{n}"] = (width, width)
    for i, block in enumerate(transformer.single_transformer_blocks):
        if layout == "kohya":
            pairs[f"lora_unet_single_blocks_{i}_linear2"] = (block.proj_out.in_features, width)
            pairs[f"lora_unet_single_blocks_{i}_modulation_lin"] = (width, 3 * width)
        else:
            pairs[f"single_blocks.{i}.processor.qkv_lora"] = (width, 3 * width)
            pairs[f"single_blocks.{i}.processor.proj_lora"] = (block.proj_out.in_features, width)
    down, up = ("lora_down", "lora_up") if layout == "kohya" else ("down", "up")
    state = {}
    for stem, (inputs, outputs) in pairs.items():
        state[f"{stem}.{down}.weight"] = torch.randn(rank, inputs, generator=generator) * std
        state[f"{stem}.{up}.weight"] = torch.randn(outputs, rank, generator=generator) * std
        if layout == "kohya":
            state[f"{stem}.alpha"] = torch.tensor(rank / 2)  # scale 0.5, which diffusers folds into the factors
    return state


def swap_without_recompiling(engine, first: dict, second: dict, image) -> torch.Tensor:
    """enable_lora_hotswap(8), `first` loaded, a call (compiles), then `second` hot-swapped in and a call, with any
    recompile an error and the count of compiled graphs unchanged; returns the swapped call's `image(engine)`."""
    from torch._dynamo.utils import counters

    engine.enable_lora_hotswap(target_rank=8)
    engine.load_lora_weights(dict(first), adapter_name="style")
    image(engine)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine.load_lora_weights(dict(second), adapter_name="style", hotswap=True)
        swapped = image(engine)
    assert counters["stats"]["unique_graphs"] == graphs
    return swapped


def fp8_inputs_fed(engine, call) -> tuple[dict[str, bool], object]:
    """{name: whether it was handed pre-quantised e4m3 input} for every Fp8Linear of engine.transformer that ran in
    `call()`, and call's result. A layer computed with its adapters' updates in one GEMM (engine.lora_gemm's op,
    which reads the layer's codes, not its forward) counts as fed when that op had e4m3 input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine.quant import Fp8Linear

    layers = {name: module for name, module in engine.transformer.named_modules() if isinstance(module, Fp8Linear)}
    fed, fused_weights = {}, set()

    class FusedGemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.flux_engine.fp8_lora_gemm.default and args[0].dtype == torch.float8_e4m3fn:
                fused_weights.add(args[2].data_ptr())
            return func(*args, **(kwargs or {}))

    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: fed.__setitem__(name, len(args) == 2))
        for name, module in layers.items()
    ]
    try:
        with FusedGemms():
            result = call()
    finally:
        for handle in handles:
            handle.remove()
    fed.update({name: True for name, module in layers.items() if module.weight_fp8.data_ptr() in fused_weights})
    return fed, result
