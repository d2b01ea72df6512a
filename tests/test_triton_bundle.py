"""engine/triton_bundle.py: our compiled Triton kernels packed from one Triton cache and unpacked into another, where
Triton itself finds them (a kernel compiled for an H100 ahead of time on this machine, as tests/kernels/
sm90_compile.py does); launcher libraries travel only where they load; inductor's kernels stay behind; a hostile
bundle writes nothing outside the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine.triton_bundle import pack_triton_kernels, unpack_triton_kernels

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (it ships ptxas)")

KERNELS = Path(__file__).parent / "kernels"
COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from sm90_compile import compile_case
from flux_kernels.gelu_fp8 import _gelu_concat_fp8_kernel
signature = {"PREFIX": "*bf16", "X": "*bf16", "OUT": "*fp8e4nv", "OUT_SCALE": "*fp32", "stride_p_b": "i64",
             "stride_p_l": "i64", "stride_x_b": "i64", "stride_x_l": "i64", "L": "i32", "KP": "i32", "K": "i32",
             "HAS_PREFIX": "constexpr", "BLOCK_P": "constexpr", "BLOCK_K": "constexpr", "APPROX_DIVIDE": "constexpr",
             "THIRDS": "constexpr", "PREFIX_SCALE": "*fp32", "stride_ps_b": "i64", "SCALED_PREFIX": "constexpr"}
constexprs = {"HAS_PREFIX": False, "BLOCK_P": 1024, "BLOCK_K": 4096, "APPROX_DIVIDE": True, "THIRDS": True,
              "SCALED_PREFIX": False}
print(json.dumps(compile_case(_gelu_concat_fp8_kernel, signature, constexprs, 16)))
"""


def compile_into(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(cache)}
    run = subprocess.run([sys.executable, "-c", COMPILE, str(KERNELS)], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def groups(cache: Path) -> dict[str, Path]:
    return {path.name: path for path in cache.glob("*/__grp__*.json")}


def test_a_packed_kernel_is_found_by_triton_in_another_cache(tmp_path):
    source, target = tmp_path / "machine-a", tmp_path / "machine-b"
    assert compile_into(source)["compiled"]
    (kernel,) = groups(source).values()
    # beside it, an inductor kernel (its artefacts carry those)
    inductor = source / "INDUCTORKEY" / "__grp__triton_poi_fused_add_0.json"
    inductor.parent.mkdir()
    (inductor.parent / "triton_poi_fused_add_0.cubin").write_bytes(b"cubin")
    inductor.write_text(json.dumps({"child_paths": {"c": str(inductor.parent / "triton_poi_fused_add_0.cubin")}}))

    bundle = tmp_path / "key.triton.zip"
    assert pack_triton_kernels(source, bundle) == 1
    assert all(kernel.parent.name in name for name in zipfile.ZipFile(bundle).namelist())
    assert unpack_triton_kernels(bundle, target) == 1
    assert unpack_triton_kernels(bundle, target) == 0  # nothing over what is there
    (unpacked,) = groups(target).values()
    children = json.loads(unpacked.read_text())["child_paths"]
    assert children.keys() == json.loads(kernel.read_text())["child_paths"].keys()
    for child, path in children.items():  # the group names the unpacked files, the same bytes
        assert Path(path).parent == unpacked.parent and Path(path).name == child
        assert Path(path).read_bytes() == (kernel.parent / child).read_bytes()
    # Triton compiling the same kernel into the second cache finds it: a miss would write the group anew
    before = unpacked.stat()
    assert compile_into(target)["compiled"]
    after = unpacked.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list(target.iterdir()) == [unpacked.parent]


def test_a_hostile_or_broken_bundle_writes_nothing_outside_the_cache(tmp_path):
    bundle = tmp_path / "evil.triton.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("KEY/__grp__k.json", json.dumps({"child_paths": {"k.cubin": "../../escaped"}}))
        archive.writestr("KEY/../../escaped", b"x")
        archive.writestr("/abs/__grp__k.json", b"{}")
    cache = tmp_path / "cache"
    assert unpack_triton_kernels(bundle, cache) == 0
    assert not (tmp_path / "escaped").exists() and not list(cache.glob("**/*.cubin"))
    with zipfile.ZipFile(tmp_path / "odd.triton.zip", "w") as archive:  # a group whose child_paths is no mapping
        archive.writestr("KEY/__grp__k.json", json.dumps({"child_paths": ["k.cubin"]}))
        archive.writestr("KEY/k.cubin", b"x")
    assert unpack_triton_kernels(tmp_path / "odd.triton.zip", cache) == 0
    (tmp_path / "broken.triton.zip").write_bytes(b"not a zip")
    assert unpack_triton_kernels(tmp_path / "broken.triton.zip", cache) == 0
    assert unpack_triton_kernels(tmp_path / "missing.triton.zip", cache) == 0
    assert pack_triton_kernels(tmp_path / "empty", tmp_path / "none.zip") == 0 and not (tmp_path / "none.zip").exists()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds a shared library with gcc")
def test_launchers_travel_only_where_they_load(tmp_path):
    """Triton's launcher libraries (built by the machine's C compiler) are packed, and unpacked only if they load
    here: one built on this machine does, a library for another machine (here: not a library at all) does not, and
    Triton then builds its own instead of failing on it."""
    source, target = tmp_path / "a", tmp_path / "b"
    good = source / ("1" * 64) / "__triton_launcher.cpython-312-x86_64-linux-gnu.so"
    foreign = source / ("2" * 64) / "cuda_utils.cpython-312-x86_64-linux-gnu.so"
    other = source / ("3" * 64) / "libsomething.so"  # not Triton's: stays behind
    for path in (good, foreign, other):
        path.parent.mkdir(parents=True)
    (tmp_path / "f.c").write_text("int flux_engine_probe(void) { return 7; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(good), str(tmp_path / "f.c")], check=True)
    foreign.write_bytes(b"\x7fELF not really")
    other.write_bytes(good.read_bytes())

    bundle = tmp_path / "key.triton.zip"
    assert pack_triton_kernels(source, bundle) == 2
    assert unpack_triton_kernels(bundle, target) == 1
    landed = target / good.parent.name / good.name
    assert landed.read_bytes() == good.read_bytes()
    assert [path for path in target.rglob("*") if path.is_file()] == [landed]  # no foreign library, no temporary file
