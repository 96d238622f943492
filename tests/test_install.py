"""The installation: nothing in the repository shadows an installed package, however and from wherever the
project starts; the lock covers every dependency; ``python -m onlinemix env`` reports what a bug report needs."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from onlinemix.tools.env import shadowed_packages

LOCK = REPO / "constraints.txt"
# Folders that Python puts first on sys.path: the current directory (python -m, python -m pytest), a
# benchmark's folder (python bench/<name>.py) and pytest's rootdir-less test folder.
PATH_FOLDERS = (REPO, REPO / "bench", REPO / "tests")
ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def importable_names(folder: Path) -> set[str]:
    """Names a folder on sys.path makes importable ahead of site-packages: modules and regular packages.

    A folder without ``__init__.py`` is at most a namespace package, which never wins over an installed one."""
    return ({p.stem for p in folder.glob("*.py")}
            | {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()})


def test_no_folder_of_the_repository_shadows_an_installed_package() -> None:
    installed = set(metadata.packages_distributions()) | set(sys.stdlib_module_names)
    for folder in PATH_FOLDERS:
        clashes = sorted((importable_names(folder) - {"onlinemix"}) & installed)
        assert clashes == [], f"{folder} would shadow installed or standard modules: {clashes}"
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must not be a package: PyPI has one of that name"


def test_a_folder_named_like_an_installed_package_is_reported(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert any("'yaml' resolves to" in c and "PyYAML" in c for c in shadowed_packages())


def test_the_train_script_imports_the_installed_package_not_its_folder(tmp_path: Path) -> None:
    """``python onlinemix/train.py`` puts onlinemix/ first on sys.path; its modules must not shadow anything there.

    A copy of the script sits beside a decoy ``tqdm.py`` (train imports tqdm): the decoy must never load."""
    folder = tmp_path / "onlinemix"
    folder.mkdir()
    shutil.copy(REPO / "onlinemix" / "train.py", folder / "train.py")
    (folder / "tqdm.py").write_text("raise ImportError('the script folder shadowed tqdm')\n")
    proc = subprocess.run([sys.executable, str(folder / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout and "shadowed" not in proc.stderr


@pytest.mark.parametrize("where", ["repository", "elsewhere"])
def test_commands_from_any_folder_use_the_installed_packages(where: str, tmp_path: Path) -> None:
    """From the repository root (which Python puts on sys.path) and from another folder: the training's
    --help, the env report (from the root), and a generator load, after which transformers and diffusers hold the PyPI
    ``kernels`` package, not the repository's kernels/ folder."""
    cwd = REPO if where == "repository" else tmp_path
    help_ = subprocess.run([sys.executable, "-m", "onlinemix.train", "--help"], capture_output=True, text=True,
                           timeout=120, cwd=cwd, env=ENV)
    assert help_.returncode == 0 and "--gen-gpus" in help_.stdout, help_.stderr[-3000:]

    if where == "repository":  # where a folder of the repository would come first on sys.path
        report = subprocess.run([sys.executable, "-m", "onlinemix", "env", "--json"], capture_output=True, text=True,
                                timeout=120, cwd=cwd, env=ENV)
        assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
        info = json.loads(report.stdout)
        assert info["conflicts"] == [] and info["libraries"]["kernels"] == metadata.version("kernels")

    load = ("import sys; from onlinemix.core.config import GeneratorConfig; from onlinemix.generation.generator import make_generator; "
            "make_generator(GeneratorConfig(), 'cpu', 32); import kernels; print(kernels.__file__)")
    proc = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300, cwd=cwd, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert origin.is_relative_to(Path(str(metadata.distribution("kernels").locate_file(""))).resolve())
    assert not origin.is_relative_to(REPO / "kernels")  # (CI's virtual environment may live in the repository)


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def test_the_lock_pins_every_dependency_of_every_extra() -> None:
    """A dependency added to pyproject.toml without the lock would install whatever is newest that day."""
    wanted = metadata.requires("onlinemix")  # pyproject.toml's dependencies and extras, as installed
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", d)[0]).lower() for d in wanted}
    missing = sorted(names - set(lock_pins()) - {"xformers"})  # xformers: a wheel per torch build, chosen by hand
    assert missing == [], f"constraints.txt lacks {missing}: refresh it with .ci/lock"


def test_the_main_libraries_are_pinned() -> None:
    assert {"torch", "torchvision", "diffusers", "transformers", "accelerate", "huggingface-hub", "safetensors",
            "webdataset", "triton", "kernels"} <= set(lock_pins())


def test_an_xformers_built_for_another_torch_is_not_used(tmp_path: Path, monkeypatch) -> None:
    """PyPI's xformers wheels are built for one torch release; with another they import but load no kernels.
    A package shaped like such an install (its own flags, as xformers sets them) stands in for it here."""
    package = tmp_path / "xformers"
    package.mkdir()
    (package / "__init__.py").write_text("__version__ = '0.0.1'\n_has_cpp_library = False\nfrom . import _cpp_lib\n")
    (package / "_cpp_lib.py").write_text(
        "from types import SimpleNamespace\n"
        "_cpp_library_load_exception = SimpleNamespace(build_info=SimpleNamespace(torch_version='2.0.0+cu118'))\n")
    (package / "ops.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in xformers_modules():
        monkeypatch.delitem(sys.modules, name)

    from onlinemix.core.config import GeneratorConfig
    from onlinemix.generation.generator import GeneratorError, make_generator, xformers_unusable

    try:
        assert "built for torch 2.0.0+cu118" in xformers_unusable()
        auto = make_generator(GeneratorConfig(model="stub", attention="auto"), "cpu", 32)
        assert auto.attention == "sdpa" and "built for torch 2.0.0+cu118" in auto.attention_reason
        with pytest.raises(GeneratorError, match="xformers cannot be used: its compiled kernels do not load"):
            make_generator(GeneratorConfig(model="stub", attention="xformers"), "cpu", 32)
    finally:  # the stand-in must not outlive the test (later tests ask whether xformers is installed)
        for name in xformers_modules():
            del sys.modules[name]


def xformers_modules() -> list[str]:
    return [m for m in sys.modules if m == "xformers" or m.startswith("xformers.")]
