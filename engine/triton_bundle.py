"""Our own Triton kernels, compiled, shipped beside the compile artefacts (engine/compiled/<key>.triton.zip).

Inductor's artefacts (engine.compile) carry the kernels inductor generates, not the ones the engine's own Triton
kernels (flux_kernels: norms, RoPE, fp8 GELU, attention) compile at their first call: a fresh machine compiles those
itself, ~3 s of the shipped start's first call on an H200 (benchmarks/NOTES.md 2026-11-30 11:45). This packs them
from a Triton cache folder and unpacks them into another one.

What travels: each kernel's cache group (Triton's `__grp__<name>.json` and the files it lists: the binary and its
metadata), under Triton's own cache key, which covers the source, the Triton version, the target GPU and the compile
options, so a stale or foreign kernel is a miss, never a wrong one. What never travels: inductor's kernels (named
`triton_*`, its artefacts carry them) and the launcher libraries (`.so` files built for one machine's Python and C
library, which loading elsewhere could crash instead of missing).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

GROUP_PREFIX = "__grp__"
INDUCTOR_PREFIX = "triton_"
# a member is "<cache key>/<file name>": one folder deep, plain names only (no "..", no absolute paths)
_MEMBER = re.compile(r"^[A-Za-z0-9_\-]+/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


def pack_triton_kernels(cache_dir: Path, out: Path) -> int:
    """Zip the engine's compiled kernels in the Triton cache `cache_dir` into `out` (written whole or not at all);
    returns how many kernels it holds (0: no file is written)."""
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
    if not groups:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    os.close(fd)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for group, children, files in groups:
            key = group.parent.name
            relative = {name: Path(path).name for name, path in children.items()}  # made absolute again on unpacking
            archive.writestr(f"{key}/{group.name}", json.dumps({"child_paths": relative}))
            for file in files:
                archive.write(file, f"{key}/{file.name}")
    os.replace(tmp, out)
    return len(groups)


def unpack_triton_kernels(bundle: Path, cache_dir: Path) -> int:
    """Put the kernels of a pack_triton_kernels `bundle` into the Triton cache `cache_dir`, the files a kernel's
    group lists before the group itself (Triton looks a kernel up by its group), never over a file that is there;
    returns how many kernels it added. A missing or unreadable bundle adds none (with a warning when unreadable)."""
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
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        logger.warning("ignoring the unreadable Triton kernel bundle %s: %s", bundle, err)
    return added


def _write_new(path: Path, data: bytes) -> None:
    """Write `path` whole (a temporary file renamed into place), unless it exists."""
    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)
