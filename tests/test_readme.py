"""The README stays true: its Python blocks run, and the commands it names exist."""

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def installed(name: str) -> str | None:
    """The console script ``name`` on PATH or beside the running interpreter (a venv's bin/ that was
    not activated: ``/path/to/venv/bin/pytest``)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_blocks_run(i, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = blocks("python")[i]
    if "import diffusers" in code and importlib.util.find_spec("diffusers") is None:
        pytest.skip("the diffusers extra is not installed (pip install '.[diffusers]')")
    exec(compile(blocks("python")[i], f"README.md python block {i}", "exec"), {})


def test_readme_names_its_two_commands_and_they_are_installed():
    text = "\n".join(blocks("bash"))
    assert "sdediff-train" in text and "pytest -q" in text
    assert installed("sdediff-train") is not None, "pip install the package to get sdediff-train"
    assert installed("sdediff-sample") is not None


def test_every_command_the_readme_names_is_installed():
    names = set(re.findall(r"^(sdediff-[a-z]+)\b", "\n".join(blocks("bash")), flags=re.M))
    assert {"sdediff-train", "sdediff-sample", "sdediff-likelihood", "sdediff-compare"} <= names
    missing = [n for n in sorted(names) if installed(n) is None]
    assert not missing, f"named in the README but not installed: {missing}"


def test_the_readme_figures_exist():
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert figures, "the README shows the notebooks' figures"
    missing = [f for f in figures if not (README.parent / f).is_file()]
    assert not missing, f"run python notebooks/_build.py to write {missing}"


def test_console_scripts_are_found_beside_the_interpreter_without_path(monkeypatch):
    # /path/to/venv/bin/pytest without an activated venv: PATH does not name the venv's bin/
    if not (Path(sys.executable).parent / "sdediff-train").exists():
        pytest.skip("the console scripts are not installed beside this interpreter")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("sdediff-train") is None
    assert installed("sdediff-train") == str(Path(sys.executable).parent / "sdediff-train")
