"""The README's quick start is what CI runs: the same install and test commands, on its first screen."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALL = 'pip install torch==2.13.0 && pip install -e ".[test]"'
TEST = "python -m pytest -q"
MAIN = "python -m engine.bench --res 2048"


def _commands(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines()]


def test_the_quick_start_is_on_the_first_screen():
    first_screen = _commands("\n".join((REPO / "README.md").read_text().splitlines()[:20]))
    assert INSTALL in first_screen and MAIN in first_screen and TEST in first_screen


def test_ci_runs_the_readme_install_and_test_commands():
    ci = _commands((REPO / ".ci" / "run").read_text())
    assert INSTALL in ci
    assert TEST in ci
    assert any(line.startswith("python3 -m venv") for line in ci)  # a fresh environment, not this machine's
    assert "ruff check ." in ci


def test_benchmarks_run_as_modules_without_path_hacks():
    # `python -m benchmarks.bench_<name>` from the repository root; no script edits sys.path to find the packages
    scripts = list((REPO / "benchmarks").rglob("bench_*.py"))
    assert any(script.parent.name == "kernels" for script in scripts)
    for script in scripts:
        assert "sys.path" not in script.read_text(), script.name
    assert "python benchmarks/bench_" not in (REPO / "README.md").read_text()
