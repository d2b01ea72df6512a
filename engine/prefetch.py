"""The CUDA libraries' pages read ahead, for a machine whose disk cache is cold.

A process loads cuBLAS's, cuDNN's and torch's GPU kernels lazily (CUDA's lazy module loading): the first call that
needs a kernel reads its code from the library file. On a machine that has run nothing yet (a fresh node, a new
container) those pages are not in the page cache, and each first launch waits for the disk; on a machine that ran
the engine before they are, and the same first call is faster (benchmarks/NOTES.md, 2026-12-01: a fresh H200's
first call at a new size 0.59-0.77 s over a warm one, a used one's 0.15 s, from the same shipped files).

`start_prefetch()`, called by optimize() on a CUDA pipeline, reads those libraries once in a background thread while
the engine builds, so the first calls find them in memory. The reads are plain file reads (no GPU work, nothing
loaded into the process). FLUX_ENGINE_PREFETCH=0 turns it off; `python -m engine.prefetch` prints which of this
process's libraries are in the page cache (`resident_fraction`, Linux's mincore).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# the libraries whose kernels a FLUX step and its VAE decode load lazily: cuBLAS(Lt) for the GEMMs, cuDNN (its
# engine libraries load on first use) for convolutions and attention, torch's own kernels, NVRTC for cuDNN's
# runtime-compiled engines
LIBRARY_MARKERS = ("libcublasLt", "libcublas.", "libcudnn", "libtorch_cuda", "libnvrtc", "libnvJitLink")
CHUNK = 8 << 20  # bytes a read
ENV = "FLUX_ENGINE_PREFETCH"


def _is_library(path: str) -> bool:
    name = os.path.basename(path)
    return ".so" in name and any(name.startswith(marker) for marker in LIBRARY_MARKERS)


def library_files(maps_text: str | None = None) -> list[Path]:
    """The CUDA libraries this process has mapped (from /proc/self/maps, or `maps_text` in its format), and the
    other libraries in the same folders (cuDNN's engine libraries are opened only at its first use), each once,
    cuBLASLt first (the GEMMs' kernels), then by size, smallest first."""
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    mapped = {line.split(maxsplit=5)[5].strip() for line in maps_text.splitlines() if len(line.split(maxsplit=5)) == 6}
    found: dict[str, Path] = {}
    for path in sorted(mapped):
        if not path.startswith("/") or not _is_library(path) or not os.path.isfile(path):
            continue
        found[os.path.realpath(path)] = Path(path)
        for sibling in sorted(Path(path).parent.iterdir()):
            if _is_library(sibling.name) and sibling.is_file():
                found.setdefault(os.path.realpath(sibling), sibling)

    def order(path: Path) -> tuple[bool, int]:
        return (not path.name.startswith("libcublasLt"), path.stat().st_size)

    return sorted(found.values(), key=order)


@dataclass
class Prefetch:
    """One background read of `files`: what it has read so far, and when it ended."""

    files: list[Path]
    bytes_read: int = 0
    seconds: float | None = None  # set when every file was read
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def run(self) -> None:
        start, buffer = time.perf_counter(), bytearray(CHUNK)
        for path in self.files:
            try:
                with open(path, "rb", buffering=0) as handle:
                    while count := handle.readinto(buffer):
                        self.bytes_read += count
            except OSError as err:
                self.errors.append(f"{path}: {err}")
        self.seconds = time.perf_counter() - start

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the reads; whether they ended."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.seconds is not None

    def summary(self) -> dict:
        return {
            "files": len(self.files), "bytes": self.bytes_read, "seconds": self.seconds, "errors": self.errors,
        }  # fmt: skip


_started: list[Prefetch] = []


def prefetch(files: list[Path]) -> Prefetch:
    """Read `files` in a daemon thread (the reads release the GIL); returns its record at once."""
    record = Prefetch(list(files))
    record.thread = threading.Thread(target=record.run, name="flux-engine-prefetch", daemon=True)
    record.thread.start()
    return record


def start_prefetch(device) -> Prefetch | None:
    """Once a process, for a CUDA `device` on Linux, unless FLUX_ENGINE_PREFETCH=0: the CUDA libraries read in the
    background (module docstring). Returns the running (or earlier) record; None when off or not on CUDA."""
    if getattr(device, "type", device) != "cuda" or not sys.platform.startswith("linux"):
        return None
    if os.environ.get(ENV, "1") not in ("1", ""):
        if os.environ[ENV] != "0":
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: set it to 1 (read the CUDA libraries ahead) or 0 (do not)")
        return None
    if not _started:
        _started.append(prefetch(library_files()))
    return _started[0]


def started() -> Prefetch | None:
    """This process's prefetch, if one started."""
    return _started[0] if _started else None


def resident_fraction(path: Path) -> float:
    """The fraction of `path`'s pages in the page cache (Linux mincore; 0.0 for an empty file)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                             ctypes.c_int, ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with open(path, "rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(byte & 1 for byte in vector) / pages
        finally:
            libc.munmap(address, size)


def residency(files: list[Path]) -> list[dict]:
    """Each file's size and resident fraction."""
    return [
        {"file": str(path), "mib": round(path.stat().st_size / 2**20, 1), "resident": round(resident_fraction(path), 3)}
        for path in files
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.prefetch [--read]`: this process's CUDA libraries and how much of each is in the page cache
    (JSON on stdout); --read reads them first and reports the read too."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(prog="python -m engine.prefetch", description=main.__doc__)
    parser.add_argument("--read", action="store_true", help="read the libraries first, and time the read")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        torch.cuda.init()
    files = library_files()
    report: dict = {"before": residency(files)}
    if args.read:
        record = prefetch(files)
        record.wait()
        report["read"], report["after"] = record.summary(), residency(files)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
