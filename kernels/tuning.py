"""Autotuned launches that tune once per card and size class, instead of once per shape and process.

Each @triton.autotune kernel here times every config the first time it meets a key: Triton's benchmark runs
25 ms of warm-up and 100 ms of timing per config, after compiling it. The keys hold token counts, so a FLUX call
at a size the process had not seen met about six new keys with three to five configs each: seconds per new size,
and again in every new process (issue "Our attention at the top", deliverable 4). Here:

- **Size classes.** Token counts enter a key by class (`token_bucket`: the next power of two), so 1360x768
  (4080 image tokens) runs 1024^2's choice (4096). A config only changes speed, never results.
- **Tables per card.** Every choice is kept per card and key in JSON:
  - `tuned/<card>.json` in this package: tables measured on our GPUs, shipped;
  - `<directory>/<card>.json` (see `tuning_directory`): each choice tuned on this machine, added as it is made
    and read by later processes.
  So a card tunes a key once, ever, and the cards we ship tables for never tune the keys in them.
- `FLUX_KERNELS_TUNING=per-process` turns both off (exact keys, tuned in each process: the behaviour before),
  to measure what they save; `retune` times every size class again without reading the tables and keeps its
  choices (how a shipped table is made: benchmarks/gpu_plan.sh tune-table).

A stored choice is used only if its config is still one of the kernel's configs (a table from another version
of a kernel's config list is skipped for the keys it no longer fits).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "tuned"
MODES = ("tables", "retune", "per-process")
_MIN_BUCKET = 256


def token_bucket(tokens: int) -> int:
    """The size class of a token count in tuning keys: the next power of two (at least 256)."""
    return max(_MIN_BUCKET, 1 << max(0, int(tokens) - 1).bit_length())


def tuning_mode() -> str:
    mode = os.environ.get("FLUX_KERNELS_TUNING", "tables")
    if mode not in MODES:
        raise ValueError(
            f"FLUX_KERNELS_TUNING={mode!r} is not a tuning mode; valid: {', '.join(MODES)} "
            "(unset it for the default, 'tables')"
        )
    return mode


_directory: Path | None = None
_stats = {"tuned": 0, "tuning_s": 0.0, "from_tables": 0}


def tuning_directory() -> Path:
    """Where this machine's choices are kept: set_tuning_directory's folder, else $FLUX_KERNELS_TUNING_DIR,
    else kernel-tuning/ in the engine's cache folder ($FLUX_ENGINE_CACHE_DIR, else ~/.cache/flux-engine)."""
    if _directory is not None:
        return _directory
    if os.environ.get("FLUX_KERNELS_TUNING_DIR"):
        return Path(os.environ["FLUX_KERNELS_TUNING_DIR"]).expanduser()
    cache = os.environ.get("FLUX_ENGINE_CACHE_DIR")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "flux-engine") / "kernel-tuning"


def set_tuning_directory(path: str | Path | None) -> None:
    """Keep this machine's choices in `path` (None: back to the default); the tables are read again from there."""
    global _directory
    _directory = None if path is None else Path(path).expanduser()
    _TABLES.clear()


def tuning_stats() -> dict:
    """This process's tuning so far: keys tuned, the seconds their tuning took (compiling and timing every config,
    then the launch), and keys whose choice came from a table."""
    return dict(_stats)


def card_name(device: torch.device) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the file name of a card's table ('cpu' under the interpreter)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def key_text(key: tuple) -> str:
    return "|".join(str(part) for part in key)


def config_identity(config) -> dict:
    """What makes a triton.Config what it is (its kwargs, warps, stages, CTAs, register cap), as JSON values."""
    identity = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    identity["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None) is not None:
        identity["maxnreg"] = config.maxnreg
    return identity


def _read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
        return table.get("kernels", {}) if isinstance(table, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # a damaged table only costs tuning again
        logger.warning("ignoring unreadable kernel tuning table %s: %s", path, err)
        return {}


_TABLES: dict[str, dict] = {}  # card -> {kernel: {key text: config identity}}, shipped under this machine's


def _table(card: str) -> dict:
    if card not in _TABLES:
        merged: dict = {}
        for path in (SHIPPED / f"{card}.json", tuning_directory() / f"{card}.json"):
            for kernel, choices in _read_table(path).items():
                merged.setdefault(kernel, {}).update(choices)
        _TABLES[card] = merged
    return _TABLES[card]


def _save_choice(card: str, kernel: str, key: str, identity: dict) -> None:
    """Add one choice to this machine's table (read again first: other processes may have added theirs), written
    whole to a temporary file and renamed, so a reader never sees half a table."""
    _table(card).setdefault(kernel, {})[key] = identity
    folder = tuning_directory()
    path, temporary = folder / f"{card}.json", None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        kernels = _read_table(path)
        kernels.setdefault(kernel, {})[key] = identity
        text = json.dumps({"card": card, "triton": _triton_version(), "kernels": kernels}, indent=1, sort_keys=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
            handle.write(text)
        temporary.chmod(0o644)  # as the engine's other files: readable by whoever shares the cache folder
        os.replace(temporary, path)
    except OSError as err:  # a read-only home must not stop a launch: the choice stays for this process
        logger.warning("could not keep the kernel tuning choice in %s: %s", path, err)
        if temporary is not None:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)


def _triton_version() -> str:
    import triton

    return triton.__version__


class TunedLaunch:
    """Launches a @triton.autotune kernel with one choice per caller-computed key, found in this order: this
    process's earlier choice, a table (see the module's docstring), or the autotuner's timing runs.

    The key must separate what the autotuner's key separates (its key arguments and the tensors' dtypes); were
    it coarser, a call would only run a config tuned for a neighbouring shape: still correct, maybe slower.
    `tokens`: the key's positions that hold token counts, compared by size class.
    A known key goes straight to the compiled kernel's launcher (one dict lookup), skipping Autotuner.run's
    per-call argument dicts and key building (several microseconds for ~20 arguments).
    """

    def __init__(self, autotuned, tokens: tuple[int, ...] = ()) -> None:
        self.autotuned = autotuned
        self.tokens = tokens
        self.name = autotuned.fn.__name__
        self.chosen: dict = {}  # key as called -> the chosen config's launch kwargs
        self.by_class: dict = {}  # key by size class -> the same

    def __call__(self, key, grid, *args, **kwargs) -> None:
        meta = self.chosen.get(key)
        if meta is None:
            meta = self._choose(key, grid, args, kwargs)
            if meta is None:
                return  # tuned: the autotuner launched the best config
        self.autotuned.fn.run(*args, grid=grid, warmup=False, **kwargs, **meta)

    def size_class(self, key: tuple) -> tuple:
        if tuning_mode() == "per-process":
            return key
        return tuple(token_bucket(part) if i in self.tokens else part for i, part in enumerate(key))

    def _choose(self, key: tuple, grid, args, kwargs) -> dict | None:
        device = args[0].device
        size_class = self.size_class(key)
        meta = self.by_class.get(size_class)
        if meta is None and self._keeps() and tuning_mode() == "tables":
            meta = self._stored(size_class, device)
        if meta is not None:
            self.chosen[key] = self.by_class[size_class] = meta
            return meta
        start = time.perf_counter()
        self.autotuned[grid](*args, **kwargs)  # times every config on the first call of its key, then launches
        best = self.autotuned.best_config
        self.chosen[key] = self.by_class[size_class] = best.all_kwargs()
        if len(self.autotuned.configs) > 1:
            _stats["tuned"] += 1
            _stats["tuning_s"] += time.perf_counter() - start
        if self._keeps():
            _save_choice(card_name(device), self.name, key_text(size_class), config_identity(best))
        return None

    def _keeps(self) -> bool:
        # one config (the interpreter's lists) is never timed: nothing to keep
        return len(self.autotuned.configs) > 1 and tuning_mode() != "per-process"

    def _stored(self, size_class: tuple, device: torch.device) -> dict | None:
        identity = _table(card_name(device)).get(self.name, {}).get(key_text(size_class))
        if identity is None:
            return None
        for config in self.autotuned.configs:
            if config_identity(config) == identity:
                _stats["from_tables"] += 1
                return config.all_kwargs()
        return None  # a config this kernel no longer has: tune again


__all__ = [
    "MODES",
    "SHIPPED",
    "TunedLaunch",
    "card_name",
    "config_identity",
    "set_tuning_directory",
    "token_bucket",
    "tuning_directory",
    "tuning_mode",
    "tuning_stats",
]
