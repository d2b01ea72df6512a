"""The transformer's whole forward captured as one CUDA graph per input signature and replayed (the CUDA-graph
step of the compile config: `compile.cuda_graphs`, with or without the regional compile around it)."""

from __future__ import annotations

import logging
import weakref

import torch
from torch.nn.modules import module as _torch_module
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

_WATCHES: weakref.WeakSet = weakref.WeakSet()  # the WeightWatches noted, for the module-registration hook
_REGISTRATION_HOOK = []  # its handle, once registered


class WeightWatch:
    """Where a module's parameters and buffers lived when graphs were captured over it. A graph reads them at those
    addresses, so weights given new memory since (`transformer.to("cpu").to("cuda")`, accelerate's
    `enable_model_cpu_offload`, `load_state_dict(..., assign=True)`) made every replay read freed memory: NaN images
    without a word (H200, 2026-12-03). `moved()` reads the addresses again through the slots noted at the capture
    (~0.08 ms at FLUX.1's ~1,000 tensors), and is also true once a module inside was replaced or added (PEFT's
    `inject_adapter_in_model` called directly: the graph would replay the layers it captured), which torch's global
    module-registration hook tells."""

    def __init__(self) -> None:
        self.slots: list[tuple[dict, str]] = []
        self.pointers: tuple | None = None
        self.module_ids: set[int] = set()
        self.swapped = False
        self.hook_dicts: list[dict] = []  # the modules' torch forward hooks, and torch's global ones
        self.hooks: tuple = ()  # their handles' ids at the capture
        self.hook_next = 0  # torch's next hook id then: no hook registered anywhere since, none added here
        self.attention: list = []  # diffusers' attention modules: their processors are read inside the graphs
        self.processors: tuple = ()

    def note(self, module: torch.nn.Module, captured: list[torch.nn.Module] | None = None) -> None:
        """`captured`: the modules the graphs run (their hooks run only while capturing); default: all inside."""
        modules = list(module.modules())
        self.slots = [(owner, name) for m in modules for owner in (m._parameters, m._buffers)
                      for name, tensor in owner.items() if tensor is not None]  # fmt: skip
        self.pointers = self._read()
        self.module_ids, self.swapped = {id(m) for m in modules}, False
        # the module's own hooks run around the replay, at every call; those inside, only while capturing
        inside = modules[1:] if captured is None else [m for block in captured for m in block.modules()]
        self.hook_dicts = [d for m in inside for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.hook_dicts += [_torch_module._global_forward_hooks, _torch_module._global_forward_pre_hooks]
        self.hooks, self.hook_next = self._hooks(), RemovableHandle.next_id
        self.attention = [m for m in modules if "processor" in m.__dict__]
        self.processors = self._processors()
        _WATCHES.add(self)
        if not _REGISTRATION_HOOK:
            _REGISTRATION_HOOK.append(register_module_module_registration_hook(_module_registered))

    def _read(self) -> tuple:
        return tuple(0 if (tensor := owner.get(name)) is None else tensor.data_ptr() for owner, name in self.slots)

    def _hooks(self) -> tuple:
        return tuple(key for hooks in self.hook_dicts for key in hooks)

    def _processors(self) -> tuple:
        return tuple((id(p := m.__dict__.get("processor")), getattr(p, "_attention_backend", None))
                     for m in self.attention)  # fmt: skip

    def moved(self) -> bool:
        """Whether what the graphs read changed since the capture: the weights' memory, the modules, the torch hooks
        inside (a hook runs only when the forward is captured, so one added or removed since would be missing or
        replayed; its Python side effects, such as recording activations, never repeat at replays), or diffusers'
        attention processors (`set_attn_processor`, `set_attention_backend` on diffusers' own blocks)."""
        if self.pointers is None:
            return False
        # a hook registered anywhere moves torch's next id; one removed here changes the count (~10 us); else the ids
        if RemovableHandle.next_id != self.hook_next or sum(map(len, self.hook_dicts)) != len(self.hooks):
            if self._hooks() != self.hooks:
                logger.warning(
                    "torch hooks inside the transformer changed since its CUDA graphs were captured: captured again. "
                    "A hook inside runs only when a graph is captured, not at its replays; for hooks that must run at "
                    "every call (recording activations), optimise with compile.cuda_graphs=False"
                )
                return True
            self.hook_next = RemovableHandle.next_id  # registered elsewhere
        return self.swapped or self._read() != self.pointers or self._processors() != self.processors


def _module_registered(parent: torch.nn.Module, name: str, submodule) -> None:
    """torch's hook on every submodule set on any module: a watched module's children changed. Not traced by dynamo
    (a setattr inside a compiled region runs again, eagerly, when dynamo applies its side effects): tracing it made
    dynamo guard on this module's set of watches, which recompiled the region once a watch was gone."""
    if torch.compiler.is_compiling():
        return
    for watch in list(_WATCHES):
        if id(parent) in watch.module_ids:
            watch.swapped = True


class TransformerGraphs:
    """The transformer's whole forward (all 57 blocks, compiled or not) captured as one CUDA graph per input
    signature (shapes, dtypes, guidance or not) and replayed: one launch per step instead of thousands,
    which is what pays at small sizes and few steps, where the CPU cannot keep the GPU fed.

    Each signature keeps its own graph and memory pool (graphs sharing a pool must replay in capture order,
    which arbitrary resolution changes would break); at most `max_graphs` are kept, oldest dropped first.
    A signature's first call runs eagerly and returns its own result: it is the warm-up a capture needs
    (compiling, kernel tuning, lazy initialisation of cuBLAS / cuDNN plans), so no forward is spent on warming up
    alone; its second call captures (host time only) and replays. So a new size costs about one capture more than
    a warm call, where two extra eager forwards on a side stream cost ~1.2 s at 2048^2 (NOTES, 2026-11-30 03:02).
    """

    TENSOR_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
    ID_ARGS = ("img_ids", "txt_ids")
    # FluxControlNetPipeline's residuals, new every step: inputs of the graph as the latents are (the ControlNet
    # itself runs before the replay, compiled as the config says, not captured)
    SAMPLE_ARGS = ("controlnet_block_samples", "controlnet_single_block_samples")

    def __init__(self, transformer: torch.nn.Module, max_graphs: int = 4):
        self.transformer = transformer
        self.forward = transformer.forward  # the bound forward being replaced (compiled blocks inside)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}  # signature -> (graph, static inputs, static output)
        self.warmed: set[tuple] = set()  # signatures that ran eagerly once since the last clear()
        self.captures = 0
        self.watch = WeightWatch()

    def install(self) -> None:
        self.transformer.forward = self

    def uninstall(self) -> None:
        if self.transformer.__dict__.get("forward") is self:
            del self.transformer.forward
        self.clear()

    def clear(self) -> None:
        """Forget every graph, and that any signature was warmed up: after a change of the modules (adapters, a
        dynamo reset), the next call of a signature must run eagerly again before a capture (recompiling inside a
        capture would fail)."""
        self.graphs.clear()
        self.warmed.clear()

    def _signature(self, kwargs: dict) -> tuple:
        def describe(value):
            if isinstance(value, list | tuple):
                return tuple(describe(item) for item in value)
            return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

        names = (*self.TENSOR_ARGS, *self.ID_ARGS, *self.SAMPLE_ARGS, "controlnet_blocks_repeat")
        return (*((name, describe(kwargs.get(name))) for name in names), global_state())

    def _inputs(self, kwargs: dict) -> dict:
        """The call's tensors by name, the ControlNet residuals one by one ("controlnet_block_samples.0", ...)."""
        tensors = {name: kwargs[name] for name in (*self.TENSOR_ARGS, *self.ID_ARGS)
                   if isinstance(kwargs.get(name), torch.Tensor)}  # fmt: skip
        for name in self.SAMPLE_ARGS:
            tensors.update({f"{name}.{index}": sample for index, sample in enumerate(kwargs.get(name) or ())})
        return tensors

    def __call__(self, *args, **kwargs):
        samples = [sample for name in self.SAMPLE_ARGS for sample in kwargs.get(name) or ()]
        unsupported = (
            args
            or kwargs.get("joint_attention_kwargs")
            or not all(isinstance(sample, torch.Tensor) for sample in samples)
        )
        if unsupported or torch.is_grad_enabled() or self.transformer.device.type != "cuda":
            return self.forward(*args, **kwargs)
        if self.graphs and self.watch.moved():  # the weights the graphs read are gone: warm up and capture again
            self.clear()
        key = self._signature(kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warmed:
                self.warmed.add(key)
                return self.forward(*args, **kwargs)  # the warm-up, and this call's result
            entry = self._capture(kwargs)
        graph, static_inputs, static_output = entry
        for name, value in self._inputs(kwargs).items():
            static_inputs[name].copy_(value, non_blocking=True)
        graph.replay()
        sample = static_output.clone()  # the next replay reuses the buffer (true CFG calls twice per step)
        return (sample,) if not kwargs.get("return_dict", True) else _transformer_output(sample)

    def _capture(self, kwargs: dict) -> tuple:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        static_inputs = {name: value.clone() for name, value in self._inputs(kwargs).items()}
        call_kwargs = {**kwargs, "return_dict": False}
        for name in (*self.TENSOR_ARGS, *self.ID_ARGS):
            if name in static_inputs:
                call_kwargs[name] = static_inputs[name]
        for name in self.SAMPLE_ARGS:
            if kwargs.get(name) is not None:
                call_kwargs[name] = [static_inputs[f"{name}.{index}"] for index in range(len(kwargs[name]))]
        graph = torch.cuda.CUDAGraph()
        # under torch.distributed, NCCL's watchdog thread queries events while this thread captures the collectives
        # of context parallelism: capture errors are this thread's only ("global" would fail on the watchdog's)
        mode = "thread_local" if torch.distributed.is_available() and torch.distributed.is_initialized() else "global"
        with torch.cuda.graph(graph, capture_error_mode=mode):
            static_output = self.forward(**call_kwargs)[0]
        self.captures += 1
        self.watch.note(self.transformer)
        entry = (graph, static_inputs, static_output)
        self.graphs[self._signature(kwargs)] = entry
        return entry


def global_state() -> tuple:
    """torch's and diffusers' global switches that decide which kernels a forward runs, baked into a capture: autocast
    (an fp16 autocast around the call replayed the bf16 capture), the SDPA backends (`sdpa_kernel`), the matmul
    precisions, diffusers' `attention_backend()` context. A call under other switches gets its own graph (~2 us)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    cuda, mm = torch.backends.cuda, torch.backends.cuda.matmul
    return (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda"),
        (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(), cuda.cudnn_sdp_enabled()),
        (mm.allow_tf32, mm.allow_bf16_reduced_precision_reduction, mm.allow_fp16_reduced_precision_reduction),
        torch.get_float32_matmul_precision(),
        str(_AttentionBackendRegistry._active_backend),
    )


def _transformer_output(sample: torch.Tensor):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def drop_captured_graphs(pipe) -> None:
    """Forget the CUDA graphs captured on `pipe` (if any); the next call captures again. For what a graph cannot
    follow (new adapter weights, scales baked in) or must not outlive (NCCL's communicator at exit)."""
    for graphs in (
        getattr(getattr(pipe, "compile_state", None), "cuda_graphs", None),
        getattr(getattr(pipe, "step_cache_state", None), "tail_graphs", None),  # First-Block Cache's (stepcache)
    ):
        if graphs is not None:
            graphs.clear()
