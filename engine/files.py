"""Writing result files: checked before the work that makes them, written whole or not at all, readable by all.

The commands check their output paths before they spend minutes on a benchmark or an image
(`check_writable`), write through a temporary file in the same folder that replaces the target in one step
(`write_atomically`: a crash never leaves half a file, nor a temporary one), and give files the usual 0644
(less what the umask takes away), as `open()` would, rather than mkstemp's 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import EngineError


def check_writable(path: Path, flag: str) -> None:
    """EngineError (naming `flag`, the path and the fix) unless a file can be written at `path`. Creates missing
    folders above it."""
    folder = path.parent
    fix = f"pass a path in a folder you can write to, e.g. {flag} {Path.home() / (path.name or 'result')}"
    if path.is_dir():
        raise EngineError(f"{flag} {str(path)!r} is a folder; name a file in it, e.g. {flag} {path / 'result.json'}")
    if folder.exists() and not folder.is_dir():
        raise EngineError(f"{flag} {str(path)!r}: {str(folder)!r} is a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise EngineError(f"{flag} {str(path)!r}: cannot write in {str(folder)!r} ({err.strerror}); {fix}") from err


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path` (same suffix, so that writers that pick the format by it
    still do), which then replaces `path`; on any failure the temporary file is removed and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fallback_paths(path: Path) -> list[Path]:
    """Where a result goes when `path` could not be written at the end of a run: the system's temporary folder,
    else the home folder (never `path` itself)."""
    candidates = [Path(tempfile.gettempdir()) / path.name, Path.home() / path.name]
    return [candidate for candidate in candidates if candidate.resolve() != path.resolve()]


def write_with_fallback(path: Path, write: Callable[[Path], None], what: str) -> Path | None:
    """`write(path)`; if that raises OSError (the disk filled, the folder went away), `write` to the first fallback
    path that takes it, saying so on stderr. Returns where it went, or None when nothing could be written."""
    import sys

    try:
        write(path)
        return path
    except OSError as err:
        failure = err
    for fallback in fallback_paths(path):
        print(f"error: could not write {what} to {path} ({failure}); writing it to {fallback} instead", file=sys.stderr)
        try:
            write(fallback)
            return fallback
        except OSError as err:
            failure = err
    print(f"error: could not write {what} anywhere ({failure})", file=sys.stderr)
    return None
