"""One pipeline call's phases timed without changing what it computes (encode, each denoising step, decode: CUDA
events on a GPU, read after the call's own final sync), the peak memory inside each, and a step's FLOPs."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------- phase timing


class Interval:
    """Start/stop marks on a device: CUDA events (read after one final sync) or perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.start_event.record()
        else:
            import time

            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record()
        else:
            import time

            self.t1 = time.perf_counter()

    def ms(self) -> float:
        if self.cuda:
            return self.start_event.elapsed_time(self.end_event)
        return (self.t1 - self.t0) * 1e3


@dataclass
class CallTimes:
    encode_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    total_ms: float = float("nan")
    peak_gib: dict = field(default_factory=dict)  # phase -> peak allocated GiB inside it


def _reset_peak(device: torch.device) -> None:
    # the allocator's counters are kept on the host at allocation time: reading and resetting them between
    # phases needs no synchronisation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _read_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@contextmanager
def record_phases(pipe, device: torch.device):
    """Times one pipeline call's phases without changing what it computes.

    The text encoding (`encode_prompt`) and the VAE decode are wrapped on the instance for the
    duration of the block; each transformer forward (one denoise step) is bracketed by module hooks.
    Events are only read after the call's final synchronisation, so timing adds no sync points.
    """
    encode, steps, decode = [], [], []
    peaks: dict[str, float] = {}
    # an optimised pipeline may have its own encode_prompt / vae.decode on the instance (offload's prompt
    # cache, the tiled VAE): put back exactly what was there
    own_encode = vars(pipe).get("encode_prompt")
    own_decode = vars(pipe.vae).get("decode")
    original_encode = pipe.encode_prompt
    original_decode = pipe.vae.decode

    def keep_peak(phase: str) -> None:
        value = _read_peak(device)
        if value is not None:
            peaks[phase] = max(peaks.get(phase, 0.0), value)

    def timed(original, intervals, phase):
        def wrapper(*args, **kwargs):
            interval = Interval(device)
            intervals.append(interval)
            _reset_peak(device)
            interval.start()
            out = original(*args, **kwargs)
            interval.stop()
            keep_peak(phase)
            return out

        return wrapper

    def pre_hook(module, args, kwargs):
        interval = Interval(device)
        steps.append(interval)
        _reset_peak(device)
        interval.start()

    def post_hook(module, args, kwargs, output):
        steps[-1].stop()
        keep_peak("denoise")

    handles = [
        pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        pipe.transformer.register_forward_hook(post_hook, with_kwargs=True),
    ]
    pipe.encode_prompt = timed(original_encode, encode, "encode")
    pipe.vae.decode = timed(original_decode, decode, "decode")
    times = CallTimes()
    total = Interval(device)
    total.start()
    try:
        yield times
    finally:
        total.stop()
        for handle in handles:
            handle.remove()
        _restore(pipe, "encode_prompt", own_encode)
        _restore(pipe.vae, "decode", own_decode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.encode_ms = [i.ms() for i in encode]
        times.step_ms = [i.ms() for i in steps]
        times.decode_ms = [i.ms() for i in decode]
        times.total_ms = total.ms()
        times.peak_gib = peaks


def _restore(owner, name: str, own) -> None:
    if own is None:
        delattr(owner, name)
    else:
        setattr(owner, name, own)


# ----------------------------------------------------------------------------- flops


def transformer_step_flops(
    transformer_config: dict, height: int, width: int, text_tokens: int, batch: int = 1, condition_tokens: int = 0
) -> int:
    """FLOPs of one transformer forward, from torch's flop counter on the meta device (no memory, no GPU);
    `condition_tokens`: image tokens a task adds beside the noise's (Kontext's input picture)."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import dtype_as_default

    config = {k: v for k, v in dict(transformer_config).items() if not k.startswith("_")}
    image_tokens = (height // 16) * (width // 16) + condition_tokens
    with torch.device("meta"), dtype_as_default(torch.bfloat16):
        model = FluxTransformer2DModel.from_config(config)
        inputs = {
            "hidden_states": torch.empty(batch, image_tokens, config["in_channels"]),
            "encoder_hidden_states": torch.empty(batch, text_tokens, config["joint_attention_dim"]),
            "pooled_projections": torch.empty(batch, config["pooled_projection_dim"]),
            "timestep": torch.empty(batch),
            "guidance": torch.empty(batch) if config.get("guidance_embeds") else None,
            "img_ids": torch.zeros(image_tokens, 3),
            "txt_ids": torch.zeros(text_tokens, 3),
        }
    with FlopCounterMode(display=False) as counter:
        model(**inputs, return_dict=False)
    return counter.get_total_flops()
