"""svd_jax.xla_defaults: the CPU flag is added before jax starts, only on CPU, only if this jaxlib knows it (probed
once and cached), never over a user's setting or opt-out; the CLI applies it."""

import json
import os
import subprocess
import sys

import pytest

from svd_jax import xla_defaults as xd

PROBE = ("import os, json; from svd_jax.xla_defaults import apply_cpu_defaults; added = apply_cpu_defaults(); "
         "import jax; jax.devices(); print(json.dumps([added, os.environ.get('XLA_FLAGS', '')]))")


def _run(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", xd.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "XDG_CACHE_HOME": str(tmp_path), **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_applied_before_jax_starts_and_cached(tmp_path):
    added, flags = _run(tmp_path)
    assert added == [xd.NO_YNN] and xd.NO_YNN in flags  # this jaxlib knows the flag; jax started with it
    cache = json.loads((tmp_path / "svd-jax" / "xla_flags.json").read_text())
    assert list(cache.values()) == [True]
    assert _run(tmp_path)[0] == [xd.NO_YNN]  # from the cache the second time


@pytest.mark.parametrize("env", [{xd.OPT_OUT: "0"}, {"JAX_PLATFORMS": "cuda,cpu"},
                                 {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}])
def test_not_applied_when_opted_out_off_cpu_or_set(tmp_path, env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(xd, "_backends_started", lambda: False)
    before = os.environ.get("XLA_FLAGS")
    assert xd.apply_cpu_defaults() == []
    assert os.environ.get("XLA_FLAGS") == before


def test_not_applied_after_jax_started_or_for_an_unknown_flag(tmp_path, monkeypatch):
    import jax

    jax.devices()  # this process's backends run already: a flag now would silently do nothing
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xd._backends_started() and xd.apply_cpu_defaults() == []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert not xd.flag_is_known("--xla_svd_jax_no_such_flag=1")  # XLA refuses to start with it


def test_the_cli_applies_it(monkeypatch, tmp_path, capsys):
    """generate and train call it after their cheap argument checks, before anything loads."""
    import numpy as np
    import PIL.Image

    from svd_jax import cli

    calls = []
    monkeypatch.setattr(xd, "apply_cpu_defaults", lambda: calls.append(1) or [xd.NO_YNN])
    monkeypatch.setattr(cli, "_load", lambda *a: (_ for _ in ()).throw(RuntimeError("stop before loading")))
    image = tmp_path / "i.png"
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert cli.main(["generate", "--image", str(image), "--output", str(tmp_path / "o.mp4")]) == 1
    assert calls == [1] and "stop before loading" in capsys.readouterr().err
