"""The package as users get it: ``python -m build`` gives a wheel and an sdist
that install into a fresh virtual environment (no test extras, no source
tree on the path) and run the main job."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # the Makefile exports the one it installed


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_and_sdist_install_in_a_fresh_venv_and_run_the_main_job(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(dist), str(ROOT)], tmp_path)
    wheel = next(dist.glob("signalprop-*.whl"))
    sdist = next(dist.glob("signalprop-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "signalprop/py.typed" in names and "signalprop/cli.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    members = tarfile.open(sdist).getnames()
    for f in ("LICENSE", "README.md", "pyproject.toml", "src/signalprop/__init__.py"):
        assert any(m.endswith(f) for m in members), f
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", TORCH_SPEC], tmp_path)
    for artefact in (wheel, sdist):
        _run([str(py), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(artefact)], tmp_path)
        _run([str(py), "-m", "pip", "install", "-q", str(artefact), TORCH_SPEC], tmp_path)
        r = _run([str(venv / "bin" / "signalprop"), "--version"], tmp_path)
        assert r.stdout.strip().startswith("signalprop ")
        out = tmp_path / f"demo-{artefact.suffix}"
        r = _run([str(venv / "bin" / "signalprop"), "demo", "--steps", "2", "--out", str(out)], tmp_path)
        assert "digits" in r.stdout and (out / "demo.json").exists()
        # imported from the venv, not from this source tree
        r = _run([str(py), "-c", "import signalprop, sys; print(signalprop.__file__)"], tmp_path)
        assert str(venv) in r.stdout
