"""flux_kernels.interpreter_fixes: Triton's interpreter is patched only inside the block, and put back after it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_the_fixes_last_only_as_long_as_the_block():
    proc = _run(
        "import flux_kernels\n"
        "from triton.runtime import interpreter as i\n"
        "before = (i.InterpreterBuilder.create_dot, i._convert_float, i._patch_lang_tensor)\n"
        "with flux_kernels.interpreter_fixes():\n"
        "    with flux_kernels.interpreter_fixes():\n"
        "        inside = (i.InterpreterBuilder.create_dot, i._convert_float, i._patch_lang_tensor)\n"
        "    still = (i.InterpreterBuilder.create_dot, i._convert_float, i._patch_lang_tensor)\n"
        "after = (i.InterpreterBuilder.create_dot, i._convert_float, i._patch_lang_tensor)\n"
        "print(all(a is not b for a, b in zip(before, inside)), still == inside, after == before)\n"
    )
    assert proc.stdout.strip() == "True True True", proc.stderr


def test_the_kernels_refuse_cpu_tensors_outside_the_block():
    proc = _run(
        "import torch\n"
        "import flux_kernels\n"
        "from flux_kernels.layernorm_modulate import layernorm_modulate\n"
        "x, shift, scale = torch.randn(1, 4, 64), torch.randn(1, 64), torch.randn(1, 64)\n"
        "try:\n"
        "    layernorm_modulate(x, shift, scale)\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
        "with flux_kernels.interpreter_fixes():\n"
        "    print('ran:', tuple(layernorm_modulate(x, shift, scale).shape))\n"
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("refused: layernorm_modulate: CPU tensors run in Triton's interpreter"), proc.stderr
    assert "with flux_kernels.interpreter_fixes():" in lines[0]
    assert lines[1] == "ran: (1, 4, 64)"
