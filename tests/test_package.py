"""pyproject.toml: `pip install .` installs the `vgg` package, importable from any folder."""

import os
import shutil
import subprocess
import sys
import tomllib

from conftest import ROOT


def test_pyproject_installs_the_vgg_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["vgg*"]  # the parts' folders too
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


def test_installed_package_imports_from_another_folder(tmp_path):
    # Build from a copy (setuptools writes build/ and *.egg-info beside the sources), offline, with the
    # venv's own setuptools, into a target folder: the shared venv is left alone.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "vgg", source / "vgg", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True, timeout=120,
                   capture_output=True)
    metadata = next(site.glob("vgg_imagenet-*.dist-info"))
    assert (metadata / "top_level.txt").read_text().split() == ["vgg"]
    assert "Requires-Dist: torch==2.14.1" in (metadata / "METADATA").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the installed copy only: the checkout is not on the path from here
    modules = "vgg, vgg.models, vgg.training.run, vgg.evaluation.runner, vgg.data.datasets.prepare, vgg.data.batches.gpu"
    result = subprocess.run([sys.executable, "-c", f"import {modules}; print(vgg.__file__)"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(site / "vgg" / "__init__.py")
    assert not list((site / "vgg").rglob("*.c"))  # nothing to compile: nvImageCodec's wheel decodes JPEGs
