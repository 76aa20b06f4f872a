"""scripts/ndif/up.sh checks its assumptions before it installs or starts anything, each
with what to do about it. Run with stand-in interpreters; no server is started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UP = Path(__file__).parents[1] / "scripts" / "ndif" / "up.sh"


def shim(directory: Path, name: str, script: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/bash\n" + script)
    path.chmod(0o755)
    return path


def python_shim(directory: Path, version: str, pip_ok: bool) -> Path:
    """A stand-in server interpreter: reports ``version``; ``-m pip`` succeeds or fails."""
    return shim(
        directory, f"python{version}", f'if [ "$1" = -m ]; then exit {0 if pip_ok else 1}; fi\necho {version}\n'
    )


def up(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "SUPERSCOPES_NDIF_HOME": str(tmp_path / "ndif"),
        "SUPERSCOPES_CLIENT_PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(["bash", str(UP)], capture_output=True, text=True, env=environment, timeout=60)


def test_a_missing_project_venv_says_make_install(tmp_path):
    result = up(tmp_path, SUPERSCOPES_CLIENT_PYTHON="/nonexistent/python")
    assert result.returncode == 1
    assert "no project venv at /nonexistent/python: run `make install` first" in result.stdout


def test_a_missing_server_interpreter_is_named(tmp_path):
    result = up(tmp_path, SUPERSCOPES_NDIF_PYTHON="/nonexistent/python3.11")
    assert result.returncode == 1
    assert "interpreter /nonexistent/python3.11 for the server venv not found" in result.stdout


def test_an_old_python_is_refused_with_its_version(tmp_path):
    result = up(tmp_path, SUPERSCOPES_NDIF_PYTHON=str(python_shim(tmp_path, "3.10", pip_ok=True)))
    assert result.returncode == 1 and "needs Python 3.12+ (3.11 works with --no-deps)" in result.stdout
    assert "is 3.10" in result.stdout


def test_a_missing_cpu_torch_wheel_is_named(tmp_path):
    result = up(tmp_path, SUPERSCOPES_NDIF_PYTHON=str(python_shim(tmp_path, "3.11", pip_ok=False)))
    assert result.returncode == 1
    assert "no torch==2.13.0+cpu wheel for Python 3.11 on the configured package indexes" in result.stdout


@pytest.mark.skipif(shutil.which("redis-server") is not None, reason="redis-server is installed here")
def test_installing_redis_without_root_says_sudo(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "id", "echo 1000\n")  # not root
    result = up(
        tmp_path,
        SUPERSCOPES_NDIF_PYTHON=str(python_shim(tmp_path, "3.11", pip_ok=True)),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    assert result.returncode == 1
    assert (
        "redis-server is not on PATH and installing it needs root: run `sudo apt-get install redis-server`"
        in result.stdout
    )
