"""The memory planner: the fastest EngineConfig predicted to fit a VRAM budget.

`plan(vram_gib, height, width)` enumerates the configs the engine can run (weight quantisation of the
transformer and T5, offload policy, VAE tiling, compile), predicts for each its peak GPU memory and its
time per image, and returns the fastest that fits, with the table of what was considered and why the
faster ones were turned down. `engine.for_budget(...)` and `python -m engine.bench --vram N`
use it.

The memory model:
- weights: exact bytes per quantisation mode, counted on the real config built on the meta device
  (engine.memory.weights.weight_bytes), split into what stays resident and what a streaming policy moves;
- a streaming policy holds `blocks_resident` slots of its largest block;
- activations: the largest live set of one transformer step, per token, by formula (ACT_* below), and the VAE
  decode's (and an input image's encode's) own peak (engine.memory.vae_peaks), tiled or not;
- overheads: the CUDA context and allocator fragmentation (RESERVE_GIB), which the budget must hold too.
The time model: a step's compute time from the H100 measurements in benchmarks/results (per token,
linear + quadratic in the sequence length), scaled by the quantisation mode, plus the copy time a
streaming policy cannot hide (its bytes over the measured host-to-device bandwidth, less the compute
it overlaps). The constants are named below with the measurement each comes from.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace

from ..config import AttentionConfig, CompileConfig, EngineConfig, OffloadConfig, QuantConfig, VaeConfig
from ..errors import ConfigError

GIB = 2**30

# ---- memory constants (bytes), calibrated on the H100 run of 2026-11-26 20:29 UTC
# (benchmarks/results/bench-memory-*-2029.json: predicted allocated peaks within 0.1-0.7 GiB of the measured ones)
# What a budget must hold beyond the peak of live tensors: the caching allocator's reserved-but-unallocated
# blocks (fragmentation) and the CUDA context. Measured under the --vram caps (bench-planner 20:36): reserved
# exceeded allocated by 1.6-2.4 GiB in every plan, and a plan predicted at 22.8 GiB failed under a 24 GiB cap
# with 21.5 allocated + 2.4 reserved-unallocated; the context (~0.5 GiB on an H100) comes on top on a real card.
RESERVE_GIB = 3.0
# Largest live activation set of one transformer step per token of the joint sequence, in units of the hidden
# size times 2 bytes. Measured: compiled blocks ~13-15 (inductor frees intermediates inside the fused regions),
# eager blocks ~28 (fp8-leaf at 2048^2: 2.67 GiB of activations for 16896 tokens).
ACT_HIDDEN_MULTIPLE = {True: 15, False: 28}  # compiled -> multiple
# Fixed working memory of a step (RoPE tables, modulation vectors, cuBLAS workspace)
ACT_FIXED_BYTES = 128 * 2**20
# T5's activations per token (hidden 4096, FF 10240, fp32 FF on random weights) are small next to its weights
T5_ACT_BYTES_PER_TOKEN = 4096 * 2 * 8

# ---- time constants, flux-dev, H100, batch 1, bf16 `kernels-compile` weights resident (lean-bf16 in the same
# 20:29 run): 127.7 ms/step at 4608 tokens and 691.0 ms at 16896, fitted as a*L + b*L^2.
STEP_MS_LINEAR = 0.022767  # ms per token
STEP_MS_QUADRATIC = 1.0732e-6  # ms per token^2 (attention)
# fp8-compile vs bf16 kernels-compile in the same run (22:28 UTC, with the fp8 activation quantisation fused into
# our norm and GELU kernels): 98.2/128.0 = 0.77 at 1024^2, 590.2/692.6 = 0.85 at 2048^2 (20:29 run, unfused:
# 0.85 / 0.91). The planner's fp8 plans all use the fused blocks (fused_norms whenever Triton runs), so the fused
# figures are the ones fitted.
COMPUTE_SCALE = {"none": 1.0, "fp8": 0.81, "nf4": 1.45, "int8-weight": 1.6, "fp8-weight": 1.6}
EAGER_SCALE = 1.42 / 1.34  # kernels eager vs kernels-compile at 1024^2
# pinned host->device, measured 54.88 GB/s on the H100 machine (engine.offload.measure_h2d_bandwidth); the
# block-streaming step time max(compute, copy) matched: 216.7 ms measured vs 216 ms of copy at 1024^2 (fp8),
# 631.2 ms vs 628.2 ms of compute at 2048^2 (with the fp8 scale of that run, 0.88; not re-run since)
H2D_GBPS = 54.9
DECODE_S_PER_MPIXEL = 0.1  # untiled VAE decode, bf16: 0.42 s at 2048^2 (4.2 Mpixel) on the H100
TILED_DECODE_SCALE = 1.08  # bench_vae 20:27: 1024/128 tiles 459.1 ms vs 423.8 ms untiled at 2048^2
LEAF_EXTRA = 1.3  # leaf streaming: 281.4 ms/step at 1024^2 for 216 ms of copies (small copies, Python hooks)


@dataclass(frozen=True)
class ComponentBytes:
    """Bytes of one component in one quantisation mode: all of it, and its largest streamed block."""

    total: int
    blocks: int  # the bytes inside the block lists (what 'block' streams)
    largest_block: int
    largest_leaf: int


def _block_prefixes(component: str) -> tuple[str, ...]:
    if component in ("transformer", "controlnet"):
        return ("transformer_blocks.", "single_transformer_blocks.")
    if component == "text_encoder_2":
        return ("encoder.block.",)
    return ("text_model.encoder.layers.",)


def _resident(net: ComponentBytes, policy: str, slots: int) -> int:
    """What of a block-streamed network stays on the device under an offload policy."""
    if policy in ("none", "model"):
        return net.total
    return net.total - net.blocks + slots * (net.largest_block if policy == "block" else net.largest_leaf)


@functools.lru_cache(maxsize=64)
def component_bytes(variant: str, component: str, mode: str, double_quant: bool = False) -> ComponentBytes:
    """Exact weight bytes of `component` of `variant` in `mode`, whole and per block, from the meta device."""
    from ..quant.policy import quantizable_linears
    from .weights import linear_weight_bytes, meta_component, tensor_bytes

    model = meta_component(variant, component)
    targets = dict(quantizable_linears(model, component)) if mode != "none" else {}
    per_block: dict[str, int] = {}
    largest_leaf = 0
    total = 0
    seen: set[int] = set()  # tied weights (T5's token embedding) are one tensor under two names
    for name, module in model.named_modules():
        own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
        fresh = [t for t in own if id(t) not in seen]
        seen.update(id(t) for t in own)
        if name in targets:
            nbytes = linear_weight_bytes(module, mode, double_quant) if fresh else 0
        else:
            nbytes = sum(tensor_bytes(t) for t in fresh)
        if not nbytes:
            continue
        total += nbytes
        for prefix in _block_prefixes(component):
            if name.startswith(prefix):
                block = prefix + name[len(prefix) :].split(".")[0]
                per_block[block] = per_block.get(block, 0) + nbytes
                largest_leaf = max(largest_leaf, nbytes)
    blocks = sum(per_block.values())
    return ComponentBytes(total, blocks, max(per_block.values(), default=0), largest_leaf)


@functools.lru_cache(maxsize=8)
def vae_weight_bytes(variant: str) -> int:
    import torch

    from ..models.builders import build_vae
    from ..models.variants import variant_spec

    with torch.device("meta"):
        vae = build_vae(variant_spec(variant))
    return sum(p.numel() for p in vae.parameters()) * 2  # bf16


def vae_config(variant: str) -> dict:
    from ..models.variants import variant_spec

    return dict(variant_spec(variant).vae)


# ----------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    config: EngineConfig
    peak_bytes: int
    seconds_per_image: float
    parts: dict = field(default_factory=dict)  # peak per phase, bytes
    fits: bool = False
    why: str = ""

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def row(self) -> dict:
        return {
            "config": self.config.label,
            "peak_GiB": round(self.peak_gib, 2),
            "s_per_image": round(self.seconds_per_image, 2),
            "fits": self.fits,
            "why": self.why,
            "phases_GiB": {k: round(v / GIB, 2) for k, v in self.parts.items()},
        }


def transformer_tokens(spec, height: int, width: int, text_tokens: int) -> int:
    return (height // 16) * (width // 16) + text_tokens


def step_compute_ms(tokens: int, mode: str, compiled: bool) -> float:
    base = STEP_MS_LINEAR * tokens + STEP_MS_QUADRATIC * tokens**2
    return base * COMPUTE_SCALE[mode] * (1.0 if compiled else EAGER_SCALE)


def predict(
    config: EngineConfig,
    variant: str,
    height: int,
    width: int,
    batch: int = 1,
    steps: int = 28,
    h2d_gbps: float = H2D_GBPS,
    task: str = "text-to-image",
) -> Prediction:
    """Peak device bytes and seconds per image of `config` (see the module docstring). `task`: Kontext's sequence
    holds its picture's tokens too; a task with an input image VAE-encodes it at the output's size; 'controlnet' adds a
    ControlNet: its weights, the residuals it hands the transformer and its blocks' compute (and copies, streamed)."""
    from ..models.controlnet import controlnet_config
    from ..models.variants import variant_spec
    from ..tasks import check_task_name, condition_tokens
    from .vae_peaks import decode_peak_bytes, encode_peak_bytes, tiling_in_force

    spec = variant_spec(variant)
    quant, offload = config.quant, config.offload
    dq = quant.nf4_double_quant
    dit = component_bytes(variant, "transformer", quant.transformer, dq)
    t5 = component_bytes(variant, "text_encoder_2", quant.text_encoder_2, dq)
    clip = component_bytes(variant, "text_encoder", quant.text_encoder, dq)
    vae = vae_weight_bytes(variant)
    hidden = spec.transformer["num_attention_heads"] * spec.transformer["attention_head_dim"]
    text_tokens = spec.t5_max_length
    tokens = transformer_tokens(spec, height, width, text_tokens) + condition_tokens(task, height, width)
    compiled = config.compile.mode != "none"
    act = batch * tokens * hidden * 2 * ACT_HIDDEN_MULTIPLE[compiled] + ACT_FIXED_BYTES
    slots = offload.blocks_resident
    # what stays on the device, per policy
    # T5's non-block weights (its token embedding) stay resident under every policy; its blocks stream
    encoders_resident = t5.total + clip.total if offload.policy == "none" else t5.total - t5.blocks
    # FluxControlNetPipeline: a ControlNet (the real layout, 5 + 10 blocks) in the transformer's mode, streamed as
    # the transformer is (engine/controlnet.py), and its residuals (one per block) held for the transformer's step
    nets = [dit]
    if task == "controlnet":
        nets.append(component_bytes(variant, "controlnet", quant.transformer, dq))
        residuals = sum(controlnet_config(variant)[key] for key in ("num_layers", "num_single_layers"))
        act += batch * residuals * transformer_tokens(spec, height, width, 0) * hidden * 2
    dit_resident = sum(_resident(net, offload.policy, slots) for net in nets)
    embeds = batch * (text_tokens * spec.t5["d_model"] + spec.clip["projection_dim"]) * 2
    resident = dit_resident + encoders_resident + vae + embeds
    if offload.policy == "none":
        encode_extra = batch * text_tokens * T5_ACT_BYTES_PER_TOKEN
    else:  # T5's blocks stream through transient slots, CLIP visits whole
        t5_visit = slots * t5.largest_block + batch * text_tokens * T5_ACT_BYTES_PER_TOKEN
        encode_extra = max(t5_visit, clip.total)
    decode_extra = decode_peak_bytes(vae_config(variant), height, width, batch, 2, config.vae)
    if check_task_name(task).required or task.startswith("kontext"):  # the text encoders are done by then
        encode_extra = max(encode_extra, encode_peak_bytes(vae_config(variant), height, width, batch, 2, config.vae))
    parts = {"encode": resident + encode_extra, "denoise": resident + act, "decode": resident + decode_extra}
    peak = max(parts.values())
    # time per image
    # a ControlNet's blocks cost per token what the transformer's cost per byte of block weights
    compute_ms = step_compute_ms(tokens * batch, quant.transformer, compiled) * sum(n.blocks for n in nets) / dit.blocks
    copy_ms = 0.0
    if offload.streams:
        streamed = sum(net.blocks for net in nets)
        copy_ms = streamed / (h2d_gbps * 1e9) * 1e3 * (LEAF_EXTRA if offload.policy == "leaf" else 1.0)
    step_ms = max(compute_ms, copy_ms) + 0.02 * min(compute_ms, copy_ms)  # the overlap is not perfect
    encode_s = 0.0 if offload.policy == "none" else (t5.total + clip.total) / (h2d_gbps * 1e9)
    tiled = tiling_in_force(config.vae, height, width)
    decode_s = DECODE_S_PER_MPIXEL * batch * height * width / 1e6 * (TILED_DECODE_SCALE if tiled else 1.0)
    seconds = steps * step_ms / 1e3 + encode_s + decode_s
    return Prediction(config, peak, seconds, parts)


# ----------------------------------------------------------------------------- the candidates


QUALITIES = ("bf16", "fp8", "any")


def candidates(quality: str, fp8_hardware: bool, triton: bool) -> list[EngineConfig]:
    """Every config the planner considers, for a fidelity floor `quality`:
    'bf16' (no weight quantisation), 'fp8' (default: also fp8, on GPUs with FP8 tensor cores), 'any' (nf4 too)."""
    if quality not in QUALITIES:
        raise ConfigError(f"quality={quality!r} is not one of {', '.join(QUALITIES)}")
    modes = ["none"]
    if quality in ("fp8", "any") and fp8_hardware:
        modes.append("fp8")
    if quality == "any":
        modes.append("nf4")
    attention = AttentionConfig(backend="auto", fused_norms=True) if triton else AttentionConfig()
    compile_config = CompileConfig(mode="regional") if triton else CompileConfig()
    configs = []
    for dit_mode, t5_mode, policy, tiling in itertools.product(
        modes, ["none", *modes[1:]], ("none", "model", "block", "leaf"), ("off", "auto-1024", "auto-512")
    ):
        vae = VaeConfig() if tiling == "off" else VaeConfig(tiling="auto", tile=int(tiling.split("-")[1]),
                                                            overlap=128 if tiling.endswith("1024") else 64)  # fmt: skip
        compiled = compile_config if policy != "leaf" else CompileConfig()
        configs.append(
            EngineConfig(
                attention=attention,
                quant=QuantConfig(transformer=dit_mode, text_encoder_2=t5_mode),
                offload=OffloadConfig(policy=policy),
                compile=compiled,
                vae=vae,
            )
        )
    return configs


QUALITY_RANK = {"none": 0, "fp8": 1, "fp8-weight": 1, "int8-weight": 1, "nf4": 2}
NEAR_FASTEST = 0.03


def _quality_cost(config: EngineConfig) -> int:
    return QUALITY_RANK[config.quant.transformer] + QUALITY_RANK[config.quant.text_encoder_2]


@dataclass
class Plan:
    budget_gib: float
    height: int
    width: int
    config: EngineConfig
    chosen: Prediction
    considered: list[Prediction]

    def explain(self, limit: int = 8) -> str:
        usable = self.budget_gib - RESERVE_GIB
        lines = [
            f"plan for {self.budget_gib:g} GiB at {self.width}x{self.height} "
            f"({usable:.2f} GiB for tensors after {RESERVE_GIB} GiB of allocator fragmentation and CUDA context):",
            f"  chosen: {replace(self.chosen.config, name='').label}  predicted peak {self.chosen.peak_gib:.2f} GiB, "
            f"{self.chosen.seconds_per_image:.1f} s/image",
        ]
        faster = [p for p in self.considered if p.seconds_per_image < self.chosen.seconds_per_image]
        if faster:
            lines.append("  faster, but predicted not to fit:")
            for p in faster[:limit]:
                lines.append(f"    {p.config.label:<60} {p.peak_gib:6.2f} GiB  {p.seconds_per_image:6.1f} s  {p.why}")
        return "\n".join(lines)


def plan(
    vram_gib: float,
    height: int = 1024,
    width: int = 1024,
    variant: str = "flux-dev",
    batch: int = 1,
    steps: int = 28,
    quality: str = "fp8",
    fp8_hardware: bool = True,
    triton: bool = True,
    h2d_gbps: float = H2D_GBPS,
    task: str = "text-to-image",
) -> Plan:
    """The fastest config predicted to fit `vram_gib` GiB; ConfigError (with the smallest peak found) if none."""
    if not vram_gib > 0:
        raise ConfigError(f"vram budget {vram_gib!r} GiB must be > 0 (e.g. 8, 12, 24)")
    variant = variant.split(":")[-1]
    usable = (vram_gib - RESERVE_GIB) * GIB
    predictions = []
    for config in candidates(quality, fp8_hardware, triton):
        p = predict(config, variant, height, width, batch, steps, h2d_gbps, task)
        p.fits = p.peak_bytes <= usable
        worst = max(p.parts, key=p.parts.get)
        p.why = "fits" if p.fits else f"{worst} needs {p.parts[worst] / GIB:.2f} GiB > {usable / GIB:.2f}"
        predictions.append(p)
    predictions.sort(key=lambda p: (p.seconds_per_image, p.peak_bytes))
    fitting = [p for p in predictions if p.fits]
    if not fitting:
        smallest = min(predictions, key=lambda p: p.peak_bytes)
        raise ConfigError(
            f"nothing fits {vram_gib:g} GiB at {width}x{height} (quality {quality!r}); the leanest config, "
            f"{smallest.config.label}, needs {smallest.peak_gib + RESERVE_GIB:.2f} GiB; raise the budget, lower "
            "the resolution, or allow quality='any' (nf4)"
        )
    # within NEAR_FASTEST of the fastest, the most faithful weights win (T5 in fp8 saves a tenth of a second
    # per new prompt: not worth its error), then the fastest
    near = [p for p in fitting if p.seconds_per_image <= fitting[0].seconds_per_image * (1 + NEAR_FASTEST)]
    chosen = min(near, key=lambda p: (_quality_cost(p.config), p.seconds_per_image, p.peak_bytes))
    name = f"plan-{vram_gib:g}gib"
    chosen.config = replace(chosen.config, name=name)
    return Plan(vram_gib, height, width, chosen.config, chosen, predictions)


# ----------------------------------------------------------------------------- the fastest preset for a machine

# The presets from fastest to slowest per step on an H100/H200, each measured beside the others in one run:
# bench-fp8-ab-h100-80gb-hbm3-20261126-2228.json (fp8-compile-fastacc-cudagraphs 87.7 ms at 1024^2, fastacc 88.1,
# fp8-compile 98.2, kernels-compile 128.0; diffusers 179.9) and the ladder of 20:53/20:58 for the eager ones.
GPU_FASTEST_FIRST = (
    "fp8-compile-fastacc-cudagraphs",
    "fp8-compile-fastacc",
    "fp8-compile",
    "kernels-compile",
    "fp8",
    "kernels",
    "compile",
)
# On a CPU, our Triton kernels and fp8 do not run; `compile` measured 1.01x per step at 2048^2 on the tiny model for
# 23 s of compiling, while the tiled VAE decodes 3x faster (benchmarks/NOTES.md, 2026-11-29).
CPU_FASTEST = "tiled-vae"


@dataclass
class FastestChoice:
    config: EngineConfig
    reason: str


def fastest_config(
    device_type: str,
    sizes: list[tuple[int, int]],
    variant: str = "flux-dev",
    card_gib: float | None = None,
    fp8_hardware: bool = False,
    triton: bool = False,
    batch: int = 1,
    steps: int = 28,
    task: str = "text-to-image",
) -> FastestChoice:
    """The fastest config for this machine at every size in `sizes` ((height, width) pairs): on CUDA the first of
    GPU_FASTEST_FIRST that runs on this GPU and is predicted to fit `card_gib` (else the planner's plan for the
    largest size); on a CPU, CPU_FASTEST. The reason says why, for the bench's first line."""
    from ..config import PRESETS

    if device_type != "cuda":
        return FastestChoice(
            PRESETS[CPU_FASTEST],
            f"{CPU_FASTEST} is the fastest preset on a CPU: our Triton kernels and fp8 need a GPU, and compile gains "
            "~1% per step for ~23 s of compiling",
        )
    variant = variant.split(":")[-1]
    usable_gib = card_gib - RESERVE_GIB
    skipped = []
    for name in GPU_FASTEST_FIRST:
        config = PRESETS[name]
        if config.quant.transformer == "fp8" and not fp8_hardware:
            skipped.append(f"{name} (needs FP8 tensor cores, sm >= 8.9)")
            continue
        if config.attention.needs_triton and not triton:
            skipped.append(f"{name} (needs Triton)")
            continue
        peak_gib = max(predict(config, variant, h, w, batch, steps, task=task).peak_gib for h, w in sizes)
        if peak_gib > usable_gib:
            skipped.append(f"{name} (needs {peak_gib + RESERVE_GIB:.1f} GiB)")
            continue
        why = f"{name} is the fastest preset measured on H100/H200 that runs on this GPU"
        if skipped:
            why = f"{name} is the fastest preset that runs on this GPU and fits it; skipped: {', '.join(skipped)}"
        return FastestChoice(config, f"{why}; predicted peak {peak_gib:.1f} of {card_gib:.1f} GiB")
    height, width = max(sizes, key=lambda size: size[0] * size[1])
    chosen = plan(card_gib, height, width, variant=variant, batch=batch, steps=steps, fp8_hardware=fp8_hardware,
                  triton=triton, task=task)  # fmt: skip
    return FastestChoice(
        chosen.config,
        f"no preset fits this GPU's {card_gib:.1f} GiB at {width}x{height}; the planner's fastest config that does "
        f"({chosen.chosen.peak_gib:.1f} GiB predicted)",
    )


def for_budget(vram_gib: float, height: int = 1024, width: int = 1024, **kwargs) -> EngineConfig:
    """The fastest EngineConfig predicted to fit `vram_gib` GiB of GPU memory (kwargs go to `plan`, e.g. variant,
    batch, fp8_hardware). Exported as `engine.for_budget`; it lives here, not on EngineConfig, so that the config
    does not import the planner that imports it."""
    return plan(vram_gib, height, width, **kwargs).config
