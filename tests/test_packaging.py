"""mmcorpus installs under its one import name: the wheel holds `mmcorpus/` and its metadata only, and a
non-editable install into a fresh virtual environment runs the commands from any folder."""

from __future__ import annotations

import os
import pathlib
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROOMS = ("pipelines", "filters", "schemas", "trainer")


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"mmcorpus." + str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
             for room in ROOMS for p in (ROOT / room).rglob("__init__.py")}
    assert found == listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: an in-tree build would leave build/ behind, and stale files in the next wheel
    for room in ROOMS:
        shutil.copytree(ROOT / room, src / room, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    import setuptools

    # this environment's setuptools when it reads pyproject's SPDX license (>= 77), else pip's isolated build
    isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation,
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("mmcorpus-*.whl")
    return built


def test_wheel_holds_only_mmcorpus(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"mmcorpus", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "mmcorpus/pipelines/runtime/child-site/sitecustomize.py" in names
    assert not any(n.startswith("mmcorpus/__init__") for n in names)  # a namespace holding the four rooms
    assert {n.split("/")[1] for n in names if n.startswith("mmcorpus/")} == set(ROOMS)


@pytest.mark.slow
def test_installed_wheel_runs_a_pipeline_from_another_folder(wheel, tmp_path, shared_data):
    """Non-editable install into a fresh venv (its dependencies borrowed from this one, mmcorpus only from the
    wheel), then `mmcorpus --help`, every subcommand's help and a real two-worker run, started outside the repo."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = next(venv.glob("lib/python3.*/site-packages"))
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (purelib / "zz_dependencies.pth").write_text("\n".join(deps) + "\n")  # plain paths: no editable finder
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--ignore-installed", "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import mmcorpus.pipelines as p; print(p.__file__)"],
                           **run)
    assert where.stdout.strip().startswith(str(purelib)), where
    exe = str(venv / "bin" / "mmcorpus")
    top = subprocess.run([exe, "--help"], **run)
    assert top.returncode == 0
    from mmcorpus.pipelines.cli import SUBCOMMANDS

    for name in SUBCOMMANDS:
        assert name in top.stdout
        assert subprocess.run([exe, name, "--help"], **run).returncode == 0
    pages = shared_data / "trafilatura-eval" / "pages"
    sample = tmp_path / "pages"
    sample.mkdir()
    for page in sorted(pages.iterdir())[:6]:
        (sample / page.name).write_bytes(page.read_bytes())
    done = subprocess.run([exe, "interleaved", str(sample), "-o", "out", "--no-images", "--workers", "2"], **run)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
