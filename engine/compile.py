"""Compilation of the FLUX transformer: regional, dynamic in the image tokens, with a persistent cache.

Regional: each of the 19 double-stream and 38 single-stream blocks is compiled with
`fullgraph=True` as a module; blocks of one class share one compiled graph (their parameters are
graph inputs), so the cost is two graphs, not 57 and not one 57-block graph (whose first call
took 276 s on an H100 here). The small modules around the blocks (time/text embedders, final
norm) are compiled the same way.

Dynamic: the blocks compile with symbolic sizes, so 512^2 to 2048^2 and non-square sizes share the
same graphs: no recompile when the resolution changes.

Cache: inductor's and Triton's on-disk caches are pointed at the engine's cache directory
(EngineConfig.cache.directory, else $FLUX_ENGINE_CACHE_DIR, else ~/.cache/flux-engine) for each transformer
forward only (torch reads them from environment variables, which are put back after the forward), and after
the first compiled call the compile artefacts (`torch.compiler.save_cache_artifacts`) are written
there under a key of the versions, the device and the config; a later process on the same machine
and versions loads them before its first call and compiles from the cache. Where the machine has none for the key,
artefacts shipped with the package for that key are loaded instead (shipped_artifacts_dir), with our own Triton
kernels compiled for it (<key>.triton.zip, engine.triton_bundle).

Inductor settings live in `inductor_options()` and nowhere else; they are passed per compile
call (`torch.compile(options=...)`), never set globally.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CacheConfig, CompileConfig
from .cuda_graphs import TransformerGraphs
from .errors import ConfigError
from .frames import Frames, read_frames
from .triton_bundle import unpack_triton_kernels

logger = logging.getLogger(__name__)

CACHE_ENV = "FLUX_ENGINE_CACHE_DIR"
# Compile artefacts shipped with the package, per card and versions (measured and written out on a GPU by
# `benchmarks/gpu_plan.sh startup-shipped`), found when the machine's own cache has none for a key: a first process
# on a new machine then starts from them. Inductor's caches are keyed by content, so a stale file only misses, it
# never serves another graph.
SHIPPED_ARTIFACTS_ENV = "FLUX_ENGINE_SHIPPED_ARTIFACTS"
# Modules around the blocks worth a graph (they fuse: sinusoidal embedding + SiLU + Linear; SiLU + Linear +
# LayerNorm + modulation). Bare Linears (x_embedder, context_embedder, proj_out) gain nothing: cuBLAS either way.
_AROUND_BLOCKS = ("time_text_embed", "norm_out")


def inductor_options(config: CompileConfig) -> dict:
    """The inductor settings of a compile, in one place.

    conv_1x1_as_mm: nothing to lose, FLUX has no big convs in the transformer. Coordinate-descent
    tuning and max-autotune are left off: they multiply the cold compile time (the target is <= 30 s)
    for a few percent on GEMMs that go to cuBLAS anyway.
    """
    # CUDA graphs are not inductor's here (`triton.cudagraphs` replays each region on its own, and a block
    # graph called 19 times per step overwrites its own outputs: measured crash on an H100); the whole
    # transformer forward is captured instead, see TransformerGraphs.
    return {"conv_1x1_as_mm": True}


# ----------------------------------------------------------------------------- the cache


def cache_root(cache: CacheConfig) -> Path:
    if cache.directory:
        return Path(cache.directory).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "flux-engine"


# torch's inductor and Triton read their on-disk cache folders from these variables and have no other switch
CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextlib.contextmanager
def compiler_caches(root: Path | None):
    """Inductor's FX-graph/AOT caches and Triton's kernel cache under `root` inside the block, and the process's
    environment as it was after it (None: nothing changes). A folder the user chose in these variables wins."""
    if root is None:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    root.mkdir(parents=True, exist_ok=True)
    # torch writes its default into the environment on first use, so a value equal to the default is not a choice
    if saved["TORCHINDUCTOR_CACHE_DIR"] in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    if saved["TRITON_CACHE_DIR"] is None:
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scope_to_forward(module: torch.nn.Module, context: Callable[[], contextlib.AbstractContextManager]) -> list:
    """`context()` entered for each forward of `module` only (a pre-hook enters it, an always-called hook leaves it):
    compiling happens inside the forward (the first call of a shape), and the process keeps its own settings around
    it. Returns the hooks' handles."""
    scopes = []

    def enter(module, args):
        scope = context()
        scope.__enter__()
        scopes.append(scope)

    def leave(module, args, output):
        if scopes:
            scopes.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


def scope_caches_to_forward(transformer: torch.nn.Module, root: Path) -> list:
    """The cache folders set for each forward only, instead of for the rest of the process."""
    return scope_to_forward(transformer, lambda: compiler_caches(root))


def dynamo_settings():
    """Dynamo's settings while the regions trace. specialize_float: a Python float the blocks read (the norms' eps)
    is a constant, not a symbol. With `dynamic=True` dynamo first made them symbols, failed to turn the eps passed to
    the norms into tensors, and traced the frame again: 3 of the 4 frames traced twice on every cold and warm start
    (warm start 6.45 -> 4.73 s on the CPU, tiny model). The floats that change between calls, the LoRA adapters'
    scales, are tensors under compile (engine.lora_calls.scalings_as_tensors), so a new scale recompiles nothing."""
    return torch._dynamo.config.patch(specialize_float=True)


def artifact_key(pipe, config) -> str:
    """Compile artefacts are only valid for the same code generator, device and graphs."""
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    device = pipe.transformer.device
    return key_of(
        {"torch": torch.__version__, "triton": version("triton"), "diffusers": version("diffusers")},
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        pipe.transformer.dtype,
        pipe.transformer.config,
        config,
    )


def key_of(versions: dict, device: str, dtype: torch.dtype, transformer_config, config) -> str:
    """artifact_key from its parts (the shipped files' names are checked against it: tests/test_compile.py). The
    parallel config counts only when it splits the work: its fields change no graph of a single-GPU run."""
    parts = {
        **versions,
        "device": device,
        "dtype": str(dtype),
        "transformer": {k: v for k, v in dict(transformer_config).items() if not k.startswith("_")},
        "attention": repr(config.attention),
        "compile": repr(config.compile),
        "quant": repr(config.quant),
        "parallel": repr(config.parallel) if config.parallel.enabled else "off",
    }
    if config.vae.compile:  # the VAE's graphs are in the artefacts too (only then: the other keys stay as they were)
        parts["vae"] = "compiled"
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20]


def manifest_key(entry: dict) -> str:
    """The key of a shipped file from its engine/compiled/MANIFEST.json entry: the model variant, preset, versions,
    device and dtype it was made for (the transformer built on the meta device: its config, no weights)."""
    from .config import preset
    from .models.builders import build_transformer
    from .models.variants import variant_spec

    with torch.device("meta"):
        transformer = build_transformer(variant_spec(entry["model"]))
    dtype = getattr(torch, entry["dtype"])
    return key_of(entry["versions"], entry["device"], dtype, transformer.config, preset(entry["preset"]))


@dataclass
class CompileState:
    """What the compile step did, for reports: where the cache is and whether artefacts were loaded/saved."""

    cache_dir: Path | None
    artifact_path: Path | None
    loaded_artifacts: bool = False  # from this machine's cache
    loaded_shipped: bool = False  # from shipped_artifacts_dir() (the machine's cache had none for the key)
    shipped_kernels: int = 0  # our Triton kernels and launchers from the shipped <key>.triton.zip (triton_bundle)
    saved_artifacts: bool = False
    compiled_modules: list[str] = field(default_factory=list)
    frames: Frames | None = None  # the regions' frames ahead of time (engine.frames), saved beside the artefacts
    frames_path: Path | None = None
    saved_frames: bool = False
    cuda_graphs: TransformerGraphs | None = None
    modules: list = field(default_factory=list)  # the compiled modules themselves, for remove_compile
    handles: list = field(default_factory=list)  # the hooks the step registered, for remove_compile


def shipped_artifacts_dir() -> Path:
    """Where shipped compile artefacts are looked for: $FLUX_ENGINE_SHIPPED_ARTIFACTS, else the package's compiled/."""
    return Path(os.environ.get(SHIPPED_ARTIFACTS_ENV) or Path(__file__).with_name("compiled"))


def load_artifacts(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - a stale or foreign cache must never stop the engine
        logger.warning("ignoring unreadable compile cache %s: %s", path, err)
        return False
    return True


def save_artifacts(path: Path) -> bool:
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    data, _info = artifacts
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------- compiling


def _compile_module(module: torch.nn.Module, config: CompileConfig, state: CompileState) -> None:
    kwargs = {"fullgraph": True, "dynamic": config.dynamic, "backend": config.backend}
    if config.backend == "inductor":
        kwargs["options"] = inductor_options(config)
    if state.frames is not None:
        state.frames.install(module, kwargs)
    else:
        module.compile(**kwargs)
    state.modules.append(module)


def remove_compile(state: CompileState) -> None:
    """Undo apply_compile: the modules run their own forward again, the hooks and the CUDA-graph replay go (the
    compiled graphs stay in dynamo's cache, unused)."""
    for module in state.modules:
        module._compiled_call_impl = None  # what nn.Module.compile set
    if state.frames is not None:
        state.frames.uninstall()
    for handle in state.handles:
        handle.remove()
    if state.cuda_graphs is not None:
        state.cuda_graphs.uninstall()


# ----------------------------------------------------------------------------- applying the config


def apply_compile(pipe, config) -> CompileState | None:
    """Compile `pipe.transformer` regionally per `config.compile` (and capture it in CUDA graphs when asked);
    None when both are off. The VAE (`config.vae.compile`): engine.vae_compile, after this."""
    compile_config: CompileConfig = config.compile
    if compile_config.mode == "none" and not compile_config.cuda_graphs:
        return None
    if compile_config.cuda_graphs and pipe.transformer.device.type != "cuda":
        raise ConfigError(
            f"compile.cuda_graphs needs the transformer on a CUDA GPU, it is on {pipe.transformer.device.type}; "
            "turn cuda_graphs off"
        )
    # First-Block Cache branches after the first block: its step cache captures the blocks after the second instead
    whole_graph = compile_config.cuda_graphs and config.step_cache.mode != "fbcache"
    if compile_config.mode == "none":
        if not whole_graph:
            return None
        graphs = TransformerGraphs(pipe.transformer)
        graphs.install()
        return CompileState(cache_dir=None, artifact_path=None, cuda_graphs=graphs)
    state = CompileState(cache_dir=None, artifact_path=None)
    if config.cache.enabled and compile_config.backend == "inductor":
        root = cache_root(config.cache)
        state.cache_dir = root
        state.artifact_path = root / "artifacts" / f"{artifact_key(pipe, config)}.bin"
        with compiler_caches(root):
            state.loaded_artifacts = load_artifacts(state.artifact_path)
            if not state.loaded_artifacts:  # the machine then saves its own copy after the first call, as cold
                shipped = shipped_artifacts_dir() / state.artifact_path.name
                state.loaded_shipped = load_artifacts(shipped)
                if state.loaded_shipped:  # and our own kernels, compiled, into the Triton cache of the forward
                    bundle = shipped.with_suffix(".triton.zip")
                    state.shipped_kernels = unpack_triton_kernels(bundle, Path(os.environ["TRITON_CACHE_DIR"]))
        if config.cache.frames:
            state.frames_path = state.artifact_path.with_suffix(".frames")
            shipped_frames = shipped_artifacts_dir() / state.frames_path.name
            state.frames = Frames(read_frames(state.frames_path) or read_frames(shipped_frames))
    transformer = pipe.transformer
    compile_regions(transformer, compile_config, state)
    if state.artifact_path is not None and not state.loaded_artifacts:
        state.handles.append(_save_after_first_call(transformer, state))
    if state.frames is not None:
        state.handles.append(_save_new_frames(transformer, state))
    if state.cache_dir is not None:
        # after the save hook: it saves inside the scope
        state.handles += scope_caches_to_forward(transformer, state.cache_dir)
    if whole_graph:
        state.cuda_graphs = TransformerGraphs(transformer)
        state.cuda_graphs.install()
    return state


def compile_regions(model: torch.nn.Module, config: CompileConfig, state: CompileState) -> None:
    """Compile `model`'s repeated blocks and the small modules around them, each as a region (a
    FluxTransformer2DModel, or a FluxControlNetModel: the same block classes, so the same graphs), recording the
    modules and hooks in `state` for remove_compile."""
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(model, name)
        for block in blocks:
            _compile_module(block, config, state)
        state.compiled_modules.append(f"{name} x{len(blocks)}")
    state.handles += _fresh_block_inputs(model) + scope_to_forward(model, dynamo_settings)
    if len(model.single_transformer_blocks):
        state.handles.append(
            model.single_transformer_blocks[0].register_forward_pre_hook(_joint_views, with_kwargs=True)
        )
    for name in _AROUND_BLOCKS:
        module = getattr(model, name, None)
        if module is not None:
            _compile_module(module, config, state)
            state.compiled_modules.append(name)


def fresh_tensor(value: torch.Tensor) -> torch.Tensor:
    """`value`, copied if it is a view: dynamo guards on a view's base, so a compiled region fed a view in one call
    and a fresh tensor in another compiles a variant of its own."""
    return value.clone() if value._base is not None else value


def _as_fresh_tensor(module, args, output):
    # Linear on a 3-D input returns a view of a 2-D matmul, which would make the first double block (fed by these)
    # compile a variant of its own. One copy of the embedded tokens (tens of MB, microseconds) saves a graph (~5 s of
    # cold compile on an H100).
    return fresh_tensor(output)


def _fresh_block_inputs(transformer) -> list:
    return [
        module.register_forward_hook(_as_fresh_tensor)
        for module in (getattr(transformer, name, None) for name in ("x_embedder", "context_embedder"))
        if module is not None
    ]


@torch.compiler.disable  # a copy, run as it is: a frame of its own to compile would cost what it saves
def _joint_views(module, args, kwargs):
    """The first single-stream block's (hidden_states, encoder_hidden_states), laid out as every later one's.

    Every later single block is fed the two halves of its predecessor's compiled output (tensors of their own, with
    the joint sequence's strides); the first is fed the double blocks' two separate tensors, and the strides differ,
    which made it compile a variant of its own: 5 graphs where 4 do, ~1/5 of the dynamo seconds of every cold and warm
    start (CPU, tiny model: the `encoder_hidden_states.stride()[0]` guard). One copy of the joint tokens, and the two
    halves detached from it (a view would be guarded on its base), make the layouts the same."""
    names = ("hidden_states", "encoder_hidden_states")
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
    hidden, encoder = values
    if not isinstance(hidden, torch.Tensor) or not isinstance(encoder, torch.Tensor):
        return None
    if hidden.requires_grad or encoder.requires_grad:  # detached halves would cut a gradient: leave it as it is
        return None
    text_tokens = encoder.shape[1]
    joint = torch.cat([encoder, hidden], dim=1)
    views = {"hidden_states": joint[:, text_tokens:].detach(), "encoder_hidden_states": joint[:, :text_tokens].detach()}
    args = list(args)
    for index, name in enumerate(names):
        if index < len(args):
            args[index] = views[name]
        else:
            kwargs[name] = views[name]
    return tuple(args), kwargs


def reload_frames(state: CompileState | None) -> None:
    """The compile state's frames forgotten, to be loaded from the cache by their next call, as in a new process
    (engine.bench's warm start: torch._dynamo.reset() does not reach them)."""
    if state is not None and state.frames is not None:
        state.frames.reload(read_frames(state.frames_path))


def _save_new_frames(transformer: torch.nn.Module, state: CompileState):
    """After each forward that made a frame (engine.frames: the first, or one that met adapters or another structure
    the saved variants' guards refuse), the frames into the cache, beside the artefacts."""

    def hook(module, args, output):
        if not state.frames.unsaved():
            return
        try:
            state.saved_frames = state.frames.save(state.frames_path)
        except OSError as err:  # said once: this process keeps its frames in memory
            logger.warning("could not write the compiled frames %s: %s", state.frames_path, err)
            handle.remove()

    handle = transformer.register_forward_hook(hook)
    return handle


def _save_after_first_call(transformer: torch.nn.Module, state: CompileState):
    """The graphs compile lazily, on the first forward: save the artefacts once it has run."""

    def hook(module, args, output):
        handle.remove()
        try:
            state.saved_artifacts = save_artifacts(state.artifact_path)
        except OSError as err:
            logger.warning("could not write the compile cache %s: %s", state.artifact_path, err)

    handle = transformer.register_forward_hook(hook)
    return handle
