"""The process group: started from torchrun's environment (NCCL on GPUs, gloo on CPUs), with NVLink multicast off
and a timeout on every collective, and the small collectives the pipeline needs (broadcasts of tensors whose
shapes only the source knows)."""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError, InputError

logger = logging.getLogger(__name__)

# NVLink SHARP / multicast stays off on the machines we run on (and in every environment we build for a child
# process): it is not enabled on the lent multi-GPU hosts, and NCCL or symmetric memory probing it can hang
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def multicast_off(env: dict | None = None) -> dict:
    """Set MULTICAST_OFF in `env` (default: this process's environment, before NCCL starts); returns `env`."""
    env = os.environ if env is None else env
    for name, value in MULTICAST_OFF.items():
        if env.get(name, value) != value:
            logger.warning("%s=%s overridden to %s: NVLink multicast stays off", name, env[name], value)
        env[name] = value
    return env


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class World:
    """This process's place in the process group."""

    rank: int
    size: int
    device: torch.device  # this rank's GPU (cuda:LOCAL_RANK), or the CPU under gloo
    backend: str
    timeout_s: float | None = None  # the default group's collective timeout (None: a group the launcher started)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors must live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def init_distributed(degree: int, timeout_s: float = 600.0, device: torch.device | str | None = None) -> World:
    """Join (or start) the default process group that torchrun described in the environment, for `degree` ranks.

    device: None picks cuda:LOCAL_RANK when CUDA is present, else the CPU (gloo). A process group that is already
    running is used as it is, if its size is `degree`.
    """
    size = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    if size != degree:
        if dist.is_initialized():
            where = f"the process group has {size}"
        elif "WORLD_SIZE" in os.environ:
            where = f"torchrun started {size}"
        else:
            where = "this process was not started by torchrun"
        raise ConfigError(
            f"the parallel config runs on {degree} processes, one per GPU; {where}. Launch your script (or -m "
            f"engine.bench / engine.generate with --gpus {degree}) with `torchrun --nproc-per-node {degree} ...`, or "
            f"set ParallelConfig(ulysses=..., ring=...) so that ulysses * ring = {size}"
        )
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if not dist.is_initialized() and missing:
        raise ConfigError(
            f"a parallel config needs the process group that torchrun sets up ({', '.join(missing)} not set); "
            f"launch with `torchrun --nproc-per-node {degree} ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _rank_device(device, local_rank)
    if not dist.is_initialized():
        multicast_off()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        atexit.register(_destroy)
        _STARTED_TIMEOUT_S[0] = timeout_s
    return World(dist.get_rank(), dist.get_world_size(), device, dist.get_backend(), _STARTED_TIMEOUT_S[0])


_STARTED_TIMEOUT_S: list[float | None] = [None]  # the timeout of the group init_distributed started


def _rank_device(device, local_rank: int) -> torch.device:
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index != local_rank:
        raise ConfigError(
            f"device {device} on the rank with LOCAL_RANK {local_rank}: each rank runs on its own GPU, "
            f"cuda:LOCAL_RANK; pass device='cuda' (or None) and every rank takes its own"
        )
    return device


# run before the process group is destroyed at exit: CUDA graphs that captured NCCL collectives must be released
# first, or ncclCommDestroy waits for them forever (pytorch/pytorch#115388; measured: a 2-GPU bench that had written
# its results sat in exit until it was killed)
_BEFORE_DESTROY: list = []
DESTROY_GRACE_S = 60.0


def before_destroy(release) -> None:
    """Call `release()` at exit, before the process group is destroyed (apply_parallel drops its CUDA graphs)."""
    _BEFORE_DESTROY.append(release)


def _destroy() -> None:
    """At exit: shutdown(), ending the process with 1 if NCCL hangs (the exit code the script meant is unknown
    here; a command line calls shutdown itself, with its own)."""
    shutdown(exit_code_on_hang=1)


def shutdown(exit_code_on_hang: int = 0) -> None:
    """Release what holds NCCL resources (before_destroy), then destroy the process group. If that does not return
    within DESTROY_GRACE_S (a peer gone, a collective stuck), the process ends with `exit_code_on_hang`: the work is
    done and written, and a hang at exit helps nobody."""
    if not dist.is_initialized():
        return
    import gc
    import threading

    timer = threading.Timer(DESTROY_GRACE_S, _exit_after_hang, args=(exit_code_on_hang,))
    timer.daemon = True
    timer.start()  # before the synchronize too: a stuck collective would block it forever
    while _BEFORE_DESTROY:
        _BEFORE_DESTROY.pop()()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.destroy_process_group()
    timer.cancel()


def _exit_after_hang(code: int) -> None:
    logger.error(
        "the process group did not shut down within %.0f s; ending the process (exit %d)", DESTROY_GRACE_S, code
    )
    os._exit(code)


# ----------------------------------------------------------------------------- broadcasts

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8)
_HEADER_SLOTS = 8  # dtype, ndim, then up to 6 sizes


def broadcast_tensor(tensor: torch.Tensor | None, world: World, src: int = 0) -> torch.Tensor:
    """`tensor` from rank `src` on every rank (others pass None or anything): a header with its dtype and shape
    first, then the values; returned on `tensor`'s device on the source and on world.device elsewhere."""
    header = torch.zeros(_HEADER_SLOTS, dtype=torch.int64, device=world.comm_device)
    if world.rank == src:
        if tensor.ndim > _HEADER_SLOTS - 2 or tensor.dtype not in _DTYPES:
            raise InputError(f"cannot broadcast a {tensor.dtype} tensor of shape {tuple(tensor.shape)}")
        header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.ndim
        header[2 : 2 + tensor.ndim] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.broadcast(header, src)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    shape = tuple(int(size) for size in header[2 : 2 + ndim])
    if world.rank == src:
        payload = tensor.detach().to(world.comm_device).contiguous()
    else:
        payload = torch.empty(shape, dtype=dtype, device=world.comm_device)
    dist.broadcast(payload, src)
    if world.rank == src:
        return tensor
    return payload.to(world.device)


def check_same_everywhere(what: str, values: tuple[float, ...], world: World) -> None:
    """InputError on every rank unless each passed the same `values` (call arguments that must agree: a rank
    called with another size would wait forever in a collective of another shape, one with another guidance would
    condition its share of the tokens differently)."""
    mine = torch.tensor(values, dtype=torch.float64, device=world.comm_device)
    gathered = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(gathered, mine)
    seen = [tuple(_plain(float(v)) for v in rank_values) for rank_values in gathered]
    if any(rank_values != seen[0] for rank_values in seen):
        listing = ", ".join(f"rank {rank}: {rank_values}" for rank, rank_values in enumerate(seen))
        raise InputError(
            f"the ranks made different {what} ({listing}); every rank must make the same call (the same size, "
            "steps, batch, guidance and negative prompt), as torchrun runs one script on all of them"
        )


def _plain(value: float) -> int | float:
    return int(value) if value.is_integer() else value
