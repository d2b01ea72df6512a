"""What the installed distribution owns: its import names are its alone, and importing it prints nothing.

The repository folder `kernels/` installs as `flux_kernels`: the import name `kernels` is Hugging Face's `kernels`
distribution, which bitsandbytes (and diffusers' hub attention backends) import; owning it would overwrite theirs,
or theirs ours, and made bitsandbytes print a probe warning on every command.
"""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = {"engine", "flux_kernels"}


def _top_level_names(dist: metadata.Distribution) -> set[str]:
    listed = dist.read_text("top_level.txt")
    if listed is not None:
        return {line.strip() for line in listed.splitlines() if line.strip()}
    names = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first.endswith((".dist-info", ".data", ".pth")) or first.startswith(("__editable__", "..")):
            continue
        names.add(first.removesuffix(".py"))
    return names


def test_the_installed_top_level_names_are_engine_and_flux_kernels():
    assert _top_level_names(metadata.distribution("flux-engine")) == OURS


def test_no_other_installed_distribution_owns_our_import_names():
    clashes = {}
    for dist in metadata.distributions():
        if dist.metadata["Name"] in (None, "flux-engine"):
            continue
        shared = _top_level_names(dist) & (OURS | {"kernels"})
        if shared & OURS:
            clashes[dist.metadata["Name"]] = shared
    assert clashes == {}


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_kernels_is_not_ours_outside_the_repository(tmp_path):
    # from any folder but the repository root (whose kernels/ folder Python finds first), `kernels` is either
    # absent or Hugging Face's, never our folder
    proc = _run_python(
        "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.strip().startswith(str(REPO)), proc.stdout
    proc = _run_python("import flux_kernels.flash_attention; print(flux_kernels.flash_attention.__file__)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent.name in ("kernels", "flux_kernels")  # editable, or a wheel's copy


def test_importing_the_engine_prints_no_third_party_notice(tmp_path):
    # engine.engines imports diffusers, which imports bitsandbytes and transformers' image processors
    proc = _run_python("import engine.engines, bitsandbytes", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stderr
    assert "requires torchvision" not in proc.stderr
    assert proc.stdout == ""


def test_the_notice_filters_drop_only_their_own_message(caplog):
    import logging

    import engine  # noqa: F401 - installs the filters

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "no module")
        logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]


def _package_name(folder: Path) -> str:
    parts = folder.relative_to(REPO).parts
    return ".".join(("flux_kernels", *parts[1:]) if parts[0] == "kernels" else parts)


def test_every_package_folder_is_listed_for_installation():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    inits = [init for top in ("engine", "kernels") for init in (REPO / top).rglob("__init__.py")]
    folders = {_package_name(init.parent) for init in inits}
    assert folders == listed  # a package left out would be missing from a non-editable install
