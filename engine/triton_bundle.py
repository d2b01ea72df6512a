"""Our own Triton kernels, compiled, and their launchers, shipped beside the compile artefacts
(engine/compiled/<key>.triton.zip).

Inductor's artefacts (engine.compile) carry the kernels inductor generates, not the ones the engine's own Triton
kernels (flux_kernels: norms, RoPE, fp8 GELU, attention) compile at their first call, nor the C launchers Triton
builds for them with the machine's compiler (~1.5 s of a fresh H200 machine's first call, 4 gcc runs: NOTES 2026-11-30
11:55). This packs both from a Triton cache folder and unpacks them into another one.

What travels, each under Triton's own cache key (so a stale or foreign one is a miss, never a wrong one):
- each kernel's cache group (Triton's `__grp__<name>.json` and the files it lists: the binary and its metadata); the
  key covers the source, the Triton version, the target GPU and the compile options;
- Triton's launcher libraries (`__triton_launcher*.so`, `cuda_utils*.so`), keyed by their C source and the platform,
  named for one Python ABI; as they were built for another machine's C library, each is loaded once on unpacking
  (dlopen, all symbols resolved) and left out if that fails, so that Triton builds its own instead of failing on it.
Never: inductor's kernels (named `triton_*`, its artefacts carry them).
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import zipfile
from pathlib import Path

from .files import write_atomically

logger = logging.getLogger(__name__)

GROUP_PREFIX = "__grp__"
LAUNCHERS = ("__triton_launcher", "cuda_utils")  # the libraries Triton's NVIDIA driver builds (runtime/build.py)
INDUCTOR_PREFIX = "triton_"
# a member is "<cache key>/<file name>": one folder deep, plain names only (no "..", no absolute paths)
_MEMBER = re.compile(r"^[A-Za-z0-9_\-]+/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


def pack_triton_kernels(cache_dir: Path, out: Path) -> int:
    """Zip the engine's compiled kernels and Triton's launcher libraries in the Triton cache `cache_dir` into `out`
    (written whole or not at all); returns how many kernels and launchers it holds (0: no file is written)."""
    groups = []
    for group in sorted(Path(cache_dir).glob(f"*/{GROUP_PREFIX}*.json")):
        kernel = group.name[len(GROUP_PREFIX) :]
        if kernel.startswith(INDUCTOR_PREFIX):
            continue
        try:
            children = json.loads(group.read_text())["child_paths"]
        except (OSError, ValueError, KeyError):
            continue  # a group Triton was still writing, or a broken one: Triton itself would not use it
        files = [group.parent / Path(path).name for path in children.values()]
        if all(file.is_file() and not file.name.endswith(".so") for file in files):
            groups.append((group, children, files))
    launchers = [path for path in sorted(Path(cache_dir).glob("*/*.so")) if path.name.startswith(LAUNCHERS)]
    if not groups and not launchers:
        return 0

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for group, children, files in groups:
                key = group.parent.name
                relative = {name: Path(path).name for name, path in children.items()}  # absolute again on unpacking
                archive.writestr(f"{key}/{group.name}", json.dumps({"child_paths": relative}))
                for file in files:
                    archive.write(file, f"{key}/{file.name}")
            for library in launchers:
                archive.write(library, f"{library.parent.name}/{library.name}")

    write_atomically(out, write)
    return len(groups) + len(launchers)


def unpack_triton_kernels(bundle: Path, cache_dir: Path) -> int:
    """Put the kernels and launchers of a pack_triton_kernels `bundle` into the Triton cache `cache_dir`: the files
    a kernel's group lists before the group itself (Triton looks a kernel up by its group), a launcher only if it loads
    here; never over a file that is there. Returns how many kernels and launchers it added. A missing or unreadable
    bundle adds none (with a warning when unreadable)."""
    if not Path(bundle).is_file():
        return 0
    added = 0
    try:
        with zipfile.ZipFile(bundle) as archive:
            members = [name for name in archive.namelist() if _MEMBER.match(name)]
            groups = [name for name in members if name.split("/")[1].startswith(GROUP_PREFIX)]
            for group in groups:
                key = group.split("/")[0]
                folder = Path(cache_dir) / key
                target = folder / group.split("/")[1]
                if target.exists():
                    continue
                children = json.loads(archive.read(group))["child_paths"]
                if not all(f"{key}/{name}" in members for name in children.values()):
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                for name in children.values():
                    _write_new(folder / name, archive.read(f"{key}/{name}"))
                absolute = {child: str(folder / name) for child, name in children.items()}
                _write_new(target, json.dumps({"child_paths": absolute}).encode())
                added += 1
            for member in members:
                key, name = member.split("/")
                if name.endswith(".so") and name.startswith(LAUNCHERS):
                    added += _add_launcher(Path(cache_dir) / key / name, archive.read(member))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as err:  # a broken bundle
        logger.warning("ignoring the unreadable Triton kernel bundle %s: %s", bundle, err)
    return added


def _add_launcher(path: Path, data: bytes) -> int:
    """Write a launcher library to `path` if it is not there and it loads here (1), else leave it out (0)."""
    if path.exists():
        return 0

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        ctypes.CDLL(str(tmp))  # resolves every symbol now: another C library or no libcuda fails here, not in Triton

    try:
        write_atomically(path, write)
    except OSError as err:
        logger.info("a shipped Triton launcher does not load here, Triton will build it: %s", err)
        return 0
    return 1


def _write_new(path: Path, data: bytes) -> None:
    """Write `path` whole (a temporary file renamed into place), unless it exists."""
    if not path.exists():
        write_atomically(path, lambda tmp: tmp.write_bytes(data))
