"""engine.prefetch: which libraries a process reads ahead, that it reads all of them, and when it does not start."""

from __future__ import annotations

import pytest

from engine import prefetch


def _library(folder, name: str, size: int):
    path = folder / name
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return path


def _maps(*paths) -> str:
    # /proc/self/maps' format: address, permissions, offset, device, inode, path (anonymous mappings have no path)
    lines = ["7f0000000000-7f0000001000 rw-p 00000000 00:00 0 "]
    lines += [
        f"7f00000{i:05x}000-7f00000{i:05x}800 r-xp 00000000 08:01 {100 + i} {path}" for i, path in enumerate(paths)
    ]
    return "\n".join(lines) + "\n"


def test_the_mapped_cuda_libraries_and_their_unmapped_siblings_are_found_cublaslt_first(tmp_path):
    cudnn, cublas, torch_lib = tmp_path / "cudnn" / "lib", tmp_path / "cublas" / "lib", tmp_path / "torch" / "lib"
    for folder in (cudnn, cublas, torch_lib):
        folder.mkdir(parents=True)
    mapped_cudnn = _library(cudnn, "libcudnn.so.9", 3000)
    engines = _library(cudnn, "libcudnn_engines_precompiled.so.9", 9000)  # opened at cuDNN's first use: not mapped
    lt = _library(cublas, "libcublasLt.so.13", 20000)
    blas = _library(cublas, "libcublas.so.13", 1000)
    torch_cuda = _library(torch_lib, "libtorch_cuda.so", 5000)
    _library(torch_lib, "libtorch_cpu.so", 100)  # not a CUDA library
    _library(cudnn, "README.txt", 10)
    maps = _maps(mapped_cudnn, lt, blas, torch_cuda, tmp_path / "gone" / "libcublasLt.so.12", "[vdso]")
    maps += _maps(lt)  # a library mapped several times (its segments) is read once

    found = prefetch.library_files(maps)

    assert found == [lt, blas, mapped_cudnn, torch_cuda, engines]  # cuBLASLt first, then smallest first


def test_the_background_read_reads_every_byte_and_reports_a_missing_file(tmp_path):
    files = [_library(tmp_path, "libcublasLt.so.13", prefetch.CHUNK + 1234), _library(tmp_path, "libcudnn.so.9", 77)]
    missing = tmp_path / "libcudnn_graph.so.9"

    record = prefetch.prefetch([*files, missing])

    assert record.wait(timeout=60)
    summary = record.summary()
    assert summary["bytes"] == prefetch.CHUNK + 1234 + 77
    assert summary["files"] == 3 and summary["seconds"] >= 0
    assert len(summary["errors"]) == 1 and str(missing) in summary["errors"][0]


def test_it_starts_once_on_cuda_only_and_the_switch_is_checked(monkeypatch):
    monkeypatch.setattr(prefetch, "_started", [])
    monkeypatch.setattr(prefetch, "library_files", lambda: [])
    monkeypatch.delenv(prefetch.ENV, raising=False)
    assert prefetch.start_prefetch("cpu") is None
    monkeypatch.setenv(prefetch.ENV, "0")
    assert prefetch.start_prefetch("cuda") is None and prefetch.started() is None
    monkeypatch.setenv(prefetch.ENV, "yes")
    with pytest.raises(ValueError, match=r"FLUX_ENGINE_PREFETCH='yes'.*1 .*or 0"):
        prefetch.start_prefetch("cuda")
    monkeypatch.setenv(prefetch.ENV, "1")
    first = prefetch.start_prefetch("cuda")
    assert first is not None and first.wait(timeout=60) and first.bytes_read == 0
    assert prefetch.start_prefetch("cuda") is first and prefetch.started() is first


def test_residency_reads_the_page_cache(tmp_path):
    written = _library(tmp_path, "libcublasLt.so.13", 5 * 4096 + 3)
    written.read_bytes()  # just written and read: in the page cache
    empty = _library(tmp_path, "libcudnn.so.9", 0)

    rows = prefetch.residency([written, empty])

    assert rows[0]["resident"] == 1.0 and rows[1]["resident"] == 0.0
    assert rows[0]["file"] == str(written)
