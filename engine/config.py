"""EngineConfig: what the engine does to a FluxPipeline, as frozen, validated dataclasses, and presets.

Each part is one independent optimisation with one switch, "off" by default, so `EngineConfig()`
is plain diffusers behaviour. Later steps (kernels, quantisation, offload, compile, VAE, cache)
widen the allowed values of their part as they land; a value is only accepted once it works.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from .errors import ConfigError
from .parallel.config import ParallelConfig
from .stepcache import StepCacheConfig, check_step_cache_fits

# The allowed values of each choice, as types (for readers and type checkers) and as tuples (for the checks below)
AttentionBackend = Literal["sdpa", "triton", "auto", "triton-fp8", "cudnn-fp8"]
QuantMode = Literal["none", "fp8", "fp8-weight", "int8-weight", "nf4"]
OffloadPolicy = Literal["none", "model", "block", "leaf"]
CompileMode = Literal["none", "regional"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]
VaeTiling = Literal["off", "on", "auto"]


def _check_choice(part: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{part}.{name}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")


@dataclass(frozen=True)
class AttentionConfig:
    """The transformer's attention blocks.

    backend: the attention core. 'sdpa': PyTorch's scaled_dot_product_attention; 'triton': our flash
        attention kernel; 'auto': the faster of the two on this GPU, measured when the config is applied;
        'triton-fp8': our quantised attention (QK^T in int8, PV in e4m3; lossy, never picked by 'auto');
        'cudnn-fp8': cuDNN's fp8 attention (Q, K, V, P and O in e4m3; lossier, faster; sm_90+ with the
        nvidia-cudnn-frontend package; never picked by 'auto').
    fused_norms: QK-RMSNorm + RoPE and LayerNorm + adaLN modulation (+ gated residual) as our Triton kernels.
    Anything but ('sdpa', False) also fuses the QKV projections (weights shared, not copied).
    """

    backend: AttentionBackend = "sdpa"
    fused_norms: bool = False

    BACKENDS = get_args(AttentionBackend)

    def __post_init__(self):
        _check_choice("attention", "backend", self.backend, self.BACKENDS)
        if not isinstance(self.fused_norms, bool):
            raise ConfigError(f"attention.fused_norms={self.fused_norms!r} must be True or False")

    @property
    def is_default(self) -> bool:
        return self.backend == "sdpa" and not self.fused_norms

    @property
    def needs_triton(self) -> bool:
        """Runs our Triton kernels ('auto' alone can fall back to SDPA)."""
        return self.fused_norms or self.backend in ("triton", "triton-fp8")

    @property
    def label(self) -> str:
        if self.is_default:
            return ""
        return f"attn={self.backend}" + ("+fused-norms" if self.fused_norms else "")


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantisation per component: transformer, text_encoder_2 (T5), text_encoder (CLIP).

    Modes (engine/quant/):
    - 'fp8': W8A8 float8 e4m3, per-channel weights, per-token dynamic activations, on the FP8 tensor cores
      (sm >= 8.9; older GPUs store fp8 and compute bf16, with a warning).
    - 'fp8-weight', 'int8-weight': weight-only (optimum-quanto qfloat8 / qint8), bf16 compute.
    - 'nf4': bitsandbytes 4-bit NormalFloat, blocks of 64, bf16 compute; CUDA only.
    nf4_double_quant: also quantise nf4's per-block scales (0.52 instead of 0.56 bytes per weight).
    fp8_fused_input: with attention.fused_norms, the kernels before the fp8 projections output e4m3 values and
        per-token scales themselves, instead of bf16 that the fp8 layer quantises again: the LayerNorm+modulate
        kernels (before qkv, txt_qkv, linear1, the MLP inputs) and the GELU kernel (before the MLP outputs and the
        single-stream proj_out). Off: for A/B runs (preset fp8-compile-unfused-quant).
    fp8_fast_accum: the fp8 GEMMs use the FP8 tensor cores' fast accumulation (`_scaled_mm(use_fast_accum=
        True)`, torchao's default): faster, with partial sums kept at lower precision; see the README's
        fidelity columns for what it costs.
    """

    transformer: QuantMode = "none"
    text_encoder_2: QuantMode = "none"
    text_encoder: QuantMode = "none"
    nf4_double_quant: bool = False
    fp8_fused_input: bool = True
    fp8_fast_accum: bool = False

    MODES = get_args(QuantMode)
    COMPONENTS = ("transformer", "text_encoder_2", "text_encoder")

    def __post_init__(self):
        for name in self.COMPONENTS:
            _check_choice("quant", name, getattr(self, name), self.MODES)
        if not isinstance(self.nf4_double_quant, bool):
            raise ConfigError(f"quant.nf4_double_quant={self.nf4_double_quant!r} must be True or False")
        if self.nf4_double_quant and "nf4" not in (self.transformer, self.text_encoder_2, self.text_encoder):
            raise ConfigError("quant.nf4_double_quant=True needs a component in mode 'nf4'")
        for name in ("fp8_fused_input", "fp8_fast_accum"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"quant.{name}={getattr(self, name)!r} must be True or False")
        if self.fp8_fast_accum and "fp8" not in (self.transformer, self.text_encoder_2, self.text_encoder):
            raise ConfigError("quant.fp8_fast_accum=True needs a component in mode 'fp8'")

    @property
    def label(self) -> str:
        short = {"transformer": "dit", "text_encoder_2": "t5", "text_encoder": "clip"}
        parts = [f"{short[n]}={getattr(self, n)}" for n in self.COMPONENTS if getattr(self, n) != "none"]
        if self.nf4_double_quant:
            parts.append("nf4dq")
        if self.fp8_fast_accum:
            parts.append("fastacc")
        if not self.fp8_fused_input and "fp8" in (self.transformer, self.text_encoder_2, self.text_encoder):
            parts.append("unfused-quant")
        return ",".join(parts)


@dataclass(frozen=True)
class OffloadConfig:
    """Where weights live between uses (engine/offload/).

    policy:
    - 'none': everything stays on the GPU.
    - 'model': the text encoders live in pinned CPU memory and visit the GPU only to encode (prompt
      embeddings are cached, so a repeated prompt does not move them); transformer and VAE stay on the GPU.
    - 'block': 'model', and the transformer's blocks (and T5's) live in pinned CPU memory and are streamed
      to the GPU on a side CUDA stream, `blocks_resident` at a time, the next ones copied while one computes.
    - 'leaf': the same one Linear at a time: the lowest VRAM, the most copies.
    blocks_resident: GPU slots of the block ring ('block'); >= 2 so that a copy overlaps a compute.
    prompt_cache: prompt embeddings kept per pipeline (0: none), for every policy but 'none'.
    """

    policy: OffloadPolicy = "none"
    blocks_resident: int = 2
    prompt_cache: int = 8

    POLICIES = get_args(OffloadPolicy)

    def __post_init__(self):
        _check_choice("offload", "policy", self.policy, self.POLICIES)
        if not isinstance(self.blocks_resident, int) or self.blocks_resident < 2:
            raise ConfigError(
                f"offload.blocks_resident={self.blocks_resident!r} must be an integer >= 2 "
                "(one block computes while the next is copied)"
            )
        if not isinstance(self.prompt_cache, int) or self.prompt_cache < 0:
            raise ConfigError(f"offload.prompt_cache={self.prompt_cache!r} must be an integer >= 0")

    @property
    def streams(self) -> bool:
        """Transformer weights are streamed from the CPU during each step."""
        return self.policy in ("block", "leaf")

    @property
    def label(self) -> str:
        if self.policy == "none":
            return ""
        resident = f"x{self.blocks_resident}" if self.policy == "block" and self.blocks_resident != 2 else ""
        return f"offload={self.policy}{resident}"


@dataclass(frozen=True)
class CompileConfig:
    """torch.compile of the transformer.

    mode: 'none' (eager) or 'regional' (each repeated block and the small modules around them,
        fullgraph=True; blocks of one class share one graph).
    dynamic: symbolic sizes, so every resolution shares the graphs (no recompile on a new size).
    cuda_graphs: capture the whole transformer forward in one CUDA graph per input shape and replay it (pays
        at small sizes and few steps, where launches dominate); works with mode 'none' too. CUDA only.
    backend: 'inductor' for speed; 'aot_eager' / 'eager' to debug graph capture (and for fast CPU tests).
    """

    mode: CompileMode = "none"
    dynamic: bool = True
    cuda_graphs: bool = False
    backend: CompileBackend = "inductor"

    MODES = get_args(CompileMode)
    BACKENDS = get_args(CompileBackend)

    def __post_init__(self):
        _check_choice("compile", "mode", self.mode, self.MODES)
        _check_choice("compile", "backend", self.backend, self.BACKENDS)
        for name in ("dynamic", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compile.{name}={getattr(self, name)!r} must be True or False")

    @property
    def label(self) -> str:
        if self.mode == "none":
            return "cudagraphs" if self.cuda_graphs else ""
        extras = [x for x, on in (("static", not self.dynamic), ("cudagraphs", self.cuda_graphs)) if on]
        backend = [] if self.backend == "inductor" else [self.backend]
        return f"compile={self.mode}" + "".join(f"+{x}" for x in extras + backend)


@dataclass(frozen=True)
class VaeConfig:
    """VAE decode/encode strategy (engine/vae.py).

    tiling: 'off': diffusers' untiled decode; 'on': always tiled; 'auto': tiled when the image is larger
        than one tile (or when the planner asks for it under a memory budget).
    tile: the side of a tile in image pixels (a multiple of 64); overlap: pixels shared by neighbouring
        tiles and blended (a multiple of 8, less than half a tile).
    compile: the decoder and encoder under torch.compile (engine.vae_compile: one graph for every size; H200 decode
        87 -> 46 ms at 1024^2, but ~45 s more cold start and 16-21 s more warm start, NOTES 2026-11-30 19:10;
        slower than `kernels` eagerly since 2026-11-30 22:22).
    kernels: the middle blocks' attention as two bf16 GEMMs around a softmax, the GroupNorms' statistics split over
        the GPU, the ResnetBlocks' biases and SiLUs folded, channels_last (engine.vae_kernels; H200 eager decode
        87 -> 28 ms at 1024^2, 396 -> 104 ms at 2048^2).
    """

    tiling: VaeTiling = "off"
    tile: int = 1024
    overlap: int = 128
    compile: bool = False
    kernels: bool = False

    TILINGS = get_args(VaeTiling)

    def __post_init__(self):
        _check_choice("vae", "tiling", self.tiling, self.TILINGS)
        if not isinstance(self.tile, int) or self.tile < 128 or self.tile % 64:
            raise ConfigError(f"vae.tile={self.tile!r} must be a multiple of 64, at least 128 (e.g. 512, 1024)")
        if not isinstance(self.overlap, int) or self.overlap < 0 or self.overlap % 8 or 2 * self.overlap >= self.tile:
            raise ConfigError(
                f"vae.overlap={self.overlap!r} must be a multiple of 8 in 0..{self.tile // 2 - 8} "
                f"(less than half of vae.tile={self.tile})"
            )
        if not isinstance(self.compile, bool):
            raise ConfigError(f"vae.compile={self.compile!r} must be True or False")
        if not isinstance(self.kernels, bool):
            raise ConfigError(f"vae.kernels={self.kernels!r} must be True or False")

    @property
    def label(self) -> str:
        size = "" if (self.tile, self.overlap) == (1024, 128) else f"{self.tile}/{self.overlap}"
        parts = ([] if self.tiling == "off" else [f"{self.tiling}{size}"]) + (["compiled"] if self.compile else [])
        parts += ["kernels"] if self.kernels else []
        return f"vae={'+'.join(parts)}" if parts else ""


@dataclass(frozen=True)
class CacheConfig:
    """Persistent compile cache (used when compile is on).

    directory: where compiled graphs and kernels are kept; None: $FLUX_ENGINE_CACHE_DIR, else
        ~/.cache/flux-engine. enabled=False compiles from scratch and keeps nothing. A directory given here also
        holds the Triton kernels' tuning choices (kernel-tuning/, see flux_kernels.tuning), for every preset.
    frames: the compiled regions' traced frames are saved there too and loaded by the next process, which then
        does not trace them again (engine.frames; a warm start's largest cost). False: traced in every process.
    """

    directory: str | None = None
    enabled: bool = True
    frames: bool = True

    def __post_init__(self):
        if self.directory is not None and not str(self.directory).strip():
            raise ConfigError("cache.directory is an empty string; pass a folder path or None for the default")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"cache.enabled={self.enabled!r} must be True or False")
        if not isinstance(self.frames, bool):
            raise ConfigError(f"cache.frames={self.frames!r} must be True or False")

    @property
    def label(self) -> str:
        return ""


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine applies to a pipeline. The default is plain diffusers behaviour."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    step_cache: StepCacheConfig = field(default_factory=StepCacheConfig)
    name: str = ""

    def __post_init__(self):
        expected = {
            "attention": AttentionConfig,
            "quant": QuantConfig,
            "offload": OffloadConfig,
            "compile": CompileConfig,
            "vae": VaeConfig,
            "cache": CacheConfig,
            "parallel": ParallelConfig,
            "step_cache": StepCacheConfig,
        }
        for part, cls in expected.items():
            value = getattr(self, part)
            if not isinstance(value, cls):
                raise ConfigError(f"EngineConfig.{part} must be a {cls.__name__}, got {type(value).__name__}")
        if self.offload.streams and self.compile.cuda_graphs:
            raise ConfigError(
                f"offload.policy={self.offload.policy!r} streams weights into new GPU memory every step, which a "
                "captured CUDA graph cannot follow; use compile.cuda_graphs=False or offload.policy 'none'/'model'"
            )
        check_step_cache_fits(self)

    @property
    def label(self) -> str:
        """A short name for tables: the preset name, or the parts that differ from the default."""
        if self.name:
            return self.name
        parts = ("attention", "quant", "offload", "compile", "vae", "parallel", "step_cache")
        parts = [getattr(self, p).label for p in parts]
        return "+".join(p for p in parts if p) or "baseline"

    @property
    def is_baseline(self) -> bool:
        return replace(self, name="") == EngineConfig()


# The parts the presets share: each preset below is a combination of these, and says only what it adds
_KERNELS = AttentionConfig(backend="auto", fused_norms=True)  # our Triton kernels, attention core by measurement
_FP8_ATTN = AttentionConfig(backend="triton-fp8", fused_norms=True)
_CUDNN_ATTN = AttentionConfig(backend="cudnn-fp8", fused_norms=True)
_REGIONAL = CompileConfig(mode="regional")
_FP8 = QuantConfig(transformer="fp8")
_FP8_FAST = QuantConfig(transformer="fp8", fp8_fast_accum=True)
_VAE_512 = VaeConfig(tiling="auto", tile=512, overlap=64)
_VAE_KERNELS = VaeConfig(kernels=True)  # GEMM attention, split GroupNorm: within the fp8 presets' tolerance
_FASTEST = {"attention": _KERNELS, "quant": _FP8_FAST, "compile": replace(_REGIONAL, cuda_graphs=True),
            "vae": _VAE_KERNELS}  # fmt: skip


def _preset(name: str, **parts) -> EngineConfig:
    return EngineConfig(name=name, **parts)


PRESETS: dict[str, EngineConfig] = {
    "baseline": _preset("baseline"),
    # our Triton kernels, eager: fused QKV, QK-norm+RoPE, adaLN modulate; attention core picked by measurement
    "kernels": _preset("kernels", attention=_KERNELS),
    # regional torch.compile of the diffusers blocks, dynamic sizes, persistent cache
    "compile": _preset("compile", compile=_REGIONAL),
    # our kernels inside the compiled regions
    "kernels-compile": _preset("kernels-compile", attention=_KERNELS, compile=_REGIONAL),
    # the same with inductor's CUDA graphs in the regions: for small sizes and few steps, where launches dominate
    "kernels-compile-cudagraphs": _preset(
        "kernels-compile-cudagraphs", attention=_KERNELS, compile=replace(_REGIONAL, cuda_graphs=True)
    ),
    # our kernels + fp8 W8A8 transformer (FP8 tensor cores on sm >= 8.9), eager
    "fp8": _preset("fp8", attention=_KERNELS, quant=_FP8),
    # the same inside the regional compile: the per-token activation quantisation is compiled with the blocks
    "fp8-compile": _preset("fp8-compile", attention=_KERNELS, quant=_FP8, compile=_REGIONAL),
    # fp8-compile with the FP8 tensor cores' fast accumulation (torchao's default): faster GEMMs, partial sums at
    # lower precision (its PSNR is in the README's ladder)
    "fp8-compile-fastacc": _preset("fp8-compile-fastacc", attention=_KERNELS, quant=_FP8_FAST, compile=_REGIONAL),
    # fp8-compile-fastacc replayed as one CUDA graph per shape: no host launch overhead (the fp8 steps at 1024^2
    # are fast enough for the host's enqueueing to show)
    "fp8-compile-fastacc-cudagraphs": _preset("fp8-compile-fastacc-cudagraphs", **_FASTEST),
    # the fastest preset with step caching (engine/stepcache): TaylorSeer's full step every 5 after 3 (8 of 28 full),
    # or First-Block Cache at 0.08 (the blocks after the second as one CUDA graph; or without graphs, each launched)
    "fp8-compile-fastacc-cudagraphs-taylorseer": _preset(
        "fp8-compile-fastacc-cudagraphs-taylorseer", **_FASTEST, step_cache=StepCacheConfig("taylorseer", interval=5)
    ),
    "fp8-compile-fastacc-cudagraphs-fbcache": _preset(
        "fp8-compile-fastacc-cudagraphs-fbcache", **_FASTEST, step_cache=StepCacheConfig("fbcache")
    ),
    "fp8-compile-fastacc-fbcache": _preset(
        "fp8-compile-fastacc-fbcache", **{**_FASTEST, "compile": _REGIONAL}, step_cache=StepCacheConfig("fbcache")
    ),
    # ablation of fp8-compile: the norm kernels write bf16 and each fp8 layer quantises its input itself
    "fp8-compile-unfused-quant": _preset(
        "fp8-compile-unfused-quant",
        attention=_KERNELS,
        quant=replace(_FP8, fp8_fused_input=False),
        compile=_REGIONAL,
    ),
    # small cards: transformer and T5 in NF4 (bitsandbytes, CUDA), a memory tool, not a speed tool
    "nf4": _preset("nf4", attention=_KERNELS, quant=QuantConfig(transformer="nf4", text_encoder_2="nf4")),
    # int8 weight-only (optimum-quanto) transformer and T5: no FP8 hardware needed
    "int8-weight": _preset(
        "int8-weight", attention=_KERNELS, quant=QuantConfig(transformer="int8-weight", text_encoder_2="int8-weight")
    ),
    # bf16 on a 24 GiB card: the transformer stays on the GPU, the text encoders visit it (T5 block by block,
    # embeddings cached), the VAE decodes in tiles
    "lean-bf16": _preset(
        "lean-bf16", attention=_KERNELS, offload=OffloadConfig(policy="model"), compile=_REGIONAL, vae=_VAE_512
    ),
    # small cards: fp8 transformer blocks streamed from pinned host memory behind the compute, tiled VAE
    "fp8-block": _preset(
        "fp8-block",
        attention=_KERNELS,
        quant=_FP8,
        offload=OffloadConfig(policy="block"),
        compile=_REGIONAL,
        vae=VaeConfig(tiling="auto"),
    ),
    # the least VRAM: one fp8 Linear at a time (eager: leaf hooks sit inside the blocks)
    "fp8-leaf": _preset(
        "fp8-leaf",
        attention=_KERNELS,
        quant=_FP8,
        offload=OffloadConfig(policy="leaf", blocks_resident=4),
        vae=_VAE_512,
    ),
    # diffusers' transformer as it is, the VAE decoded in 512-px tiles, blended: the fastest preset on a CPU, where our
    # Triton kernels and fp8 do not run and compile gains ~1% per step for ~23 s of compiling; tiles that fit the
    # caches decode the tiny model's 2048^2 image 3x faster there (benchmarks/NOTES.md, 2026-11-29)
    "tiled-vae": _preset("tiled-vae", vae=_VAE_512),
    # the same with our flash attention forced (for ablations: attention kernel vs SDPA)
    "kernels-triton-attn": _preset("kernels-triton-attn", attention=replace(_KERNELS, backend="triton")),
    # the quantised attention core (flux_kernels.fp8_attention; q and k leave the QK-norm kernel as int8)
    "kernels-compile-fp8attn": _preset("kernels-compile-fp8attn", attention=_FP8_ATTN, compile=_REGIONAL),
    "fp8-compile-fastacc-cudagraphs-fp8attn": _preset(
        "fp8-compile-fastacc-cudagraphs-fp8attn", **{**_FASTEST, "attention": _FP8_ATTN}
    ),
    # cuDNN's fp8 attention core (flux_kernels.cudnn_attention: e4m3 Q, K, V, P, O), needs nvidia-cudnn-frontend
    "fp8-compile-fastacc-cudagraphs-cudnnattn": _preset(
        "fp8-compile-fastacc-cudagraphs-cudnnattn", **{**_FASTEST, "attention": _CUDNN_ATTN}
    ),
    # the same with the VAE compiled (engine.vae_compile): faster images, a slower start (opt-in, never the default)
    "fp8-compile-fastacc-cudagraphs-cudnnattn-compiledvae": _preset(
        "fp8-compile-fastacc-cudagraphs-cudnnattn-compiledvae",
        **{**_FASTEST, "attention": _CUDNN_ATTN, "vae": replace(_VAE_KERNELS, compile=True)},
    ),
}


def preset(name: str) -> EngineConfig:
    """The EngineConfig of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_config(config: EngineConfig | str | None) -> EngineConfig:
    if config is None:
        return PRESETS["baseline"]
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, EngineConfig):
        return config
    raise ConfigError(f"config must be an EngineConfig or a preset name, got {type(config).__name__}")
