"""The converter's command lines work installed, from any directory (not only the repository root)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _svd_jax_command() -> list[str]:
    """The installed ``svd-jax`` console script next to this interpreter, else its module."""
    script = Path(sys.executable).parent / ("svd-jax.exe" if os.name == "nt" else "svd-jax")
    return [str(script)] if script.exists() else [sys.executable, "-m", "svd_jax.cli"]


COMMANDS = {
    "python -m convert": [sys.executable, "-m", "convert"],
    "python -m svd_jax.convert": [sys.executable, "-m", "svd_jax.convert"],
    "svd-jax convert": [*_svd_jax_command(), "convert"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_convert_help_outside_the_repo(name, tmp_path):
    # A cwd outside the repository and no PYTHONPATH: only what is installed can be imported.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([*COMMANDS[name], "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    usage = proc.stdout.split("\n\n", 1)[0]  # argparse's usage block: "usage: PROG [options] src dst"
    assert usage.startswith("usage:"), proc.stdout
    assert re.search(r"\bsrc\s+dst\b", usage, re.IGNORECASE), usage
