"""The persistent compilation cache: where it goes, how to switch it off, and a real hit in a second process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from svd_jax import compile_cache as cc

_OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
            "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def jax_cache_config(monkeypatch):
    """Clean environment and jax cache config for one test; the previous values are put back afterwards, so
    no other test (in this process) compiles into a temporary cache dir."""
    for var in (cc.ENV_DIR, cc.ENV_SWITCH, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    saved = {k: getattr(jax.config, k) for k in _OPTIONS if hasattr(jax.config, k)}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # forget a cache opened on a temporary dir (none is, but be sure)


def test_default_dir(jax_cache_config, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cc.default_cache_dir() == tmp_path / "home" / ".cache" / "svd-jax" / "xla"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.default_cache_dir() == tmp_path / "xdg" / "svd-jax" / "xla"
    monkeypatch.setenv(cc.ENV_DIR, str(tmp_path / "mine"))
    assert cc.default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(cc.ENV_DIR, "")  # empty means unset
    assert cc.default_cache_dir() == tmp_path / "xdg" / "svd-jax" / "xla"


def test_enable_sets_jax_config(jax_cache_config, monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV_DIR, str(tmp_path / "env"))
    got = cc.enable_compile_cache()
    assert got == (tmp_path / "env").resolve() and got.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(got)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == cc.MIN_COMPILE_TIME_SECS
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == cc.MIN_ENTRY_SIZE_BYTES
    # idempotent: a second call (even with another path) keeps the first directory
    assert cc.enable_compile_cache() == got
    assert cc.enable_compile_cache(tmp_path / "other") == got
    assert jax.config.jax_compilation_cache_dir == str(got)
    assert not (tmp_path / "other").exists()


def test_explicit_path_beats_env(jax_cache_config, monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV_DIR, str(tmp_path / "env"))
    assert cc.enable_compile_cache(tmp_path / "arg") == (tmp_path / "arg").resolve()
    assert jax.config.jax_compilation_cache_dir == str((tmp_path / "arg").resolve())


def test_user_config_respected(jax_cache_config, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "user"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
    assert cc.enable_compile_cache(tmp_path / "ours") == tmp_path / "user"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "user")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 7.0  # the user's settings stay
    assert not (tmp_path / "ours").exists()


def test_remote_urls(jax_cache_config, monkeypatch, tmp_path):
    assert cc.enable_compile_cache("gs://bucket/xla") is None  # refused, not mangled into a local "gs:" dir
    monkeypatch.setenv(cc.ENV_DIR, "gs://bucket/xla")
    assert cc.enable_compile_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_compilation_cache_dir", "gs://bucket/user")  # the user's own remote cache stays
    assert cc.enable_compile_cache(tmp_path / "ours") is None
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/user"


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_opt_out(jax_cache_config, monkeypatch, tmp_path, value):
    monkeypatch.setenv(cc.ENV_SWITCH, value)
    monkeypatch.setenv(cc.ENV_DIR, str(tmp_path / "env"))
    before = {k: getattr(jax.config, k) for k in _OPTIONS}
    assert cc.enable_compile_cache() is None
    assert cc.enable_compile_cache(tmp_path / "arg") is None
    assert {k: getattr(jax.config, k) for k in _OPTIONS} == before
    assert not (tmp_path / "env").exists() and not (tmp_path / "arg").exists()


def test_jax_cache_disabled_by_user(jax_cache_config, tmp_path):
    jax.config.update("jax_enable_compilation_cache", False)
    assert cc.enable_compile_cache(tmp_path / "arg") is None
    assert jax.config.jax_compilation_cache_dir is None


# A child process: enable the cache from $SVD_JAX_CACHE_DIR, compile a few matmuls + a lax.scan ahead of time
# from abstract shapes (so that no other program compiles around it), and report jax's own cache events for
# that one compile.
_CHILD = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from svd_jax.compile_cache import enable_compile_cache

    path = enable_compile_cache()
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))

    def f(w, x):
        def body(h, _):
            h = jnp.tanh(h @ w) @ w.T + h
            return h, jnp.sum(h)
        h, sums = jax.lax.scan(body, x @ w, None, length=8)
        return h, sums

    s = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    lowered = jax.jit(f).lower(s, s)
    events.clear()
    lowered.compile()
    print("RESULT", json.dumps({"path": str(path), "events": events}))
""")


def _run_child(env):
    out = subprocess.run([sys.executable, "-c", _CHILD], check=False, env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_second_process_hits_cache(tmp_path):
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k not in (cc.ENV_SWITCH, "JAX_COMPILATION_CACHE_DIR")}
    env.update({cc.ENV_DIR: str(cache), "JAX_PLATFORMS": "cpu"})

    first = _run_child(env)
    assert first["path"] == str(cache.resolve())
    assert "/jax/compilation_cache/cache_misses" in first["events"]
    assert "/jax/compilation_cache/cache_hits" not in first["events"]
    entries = list(cache.iterdir())
    assert entries, "the first process wrote nothing to the cache"

    second = _run_child(env)
    assert "/jax/compilation_cache/cache_hits" in second["events"]
    assert "/jax/compilation_cache/cache_misses" not in second["events"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in entries)  # nothing new written


def _entries(cache):
    return sorted(p.name for p in cache.iterdir() if p.is_file())


def test_copied_cache_still_hits(tmp_path):
    """A cache folder copied elsewhere (a VM image, a pod's shared disk) is a hit: no key holds its path."""
    import shutil

    env = {k: v for k, v in os.environ.items() if k not in (cc.ENV_SWITCH, "JAX_COMPILATION_CACHE_DIR")}
    env.update({cc.ENV_DIR: str(tmp_path / "a"), "JAX_PLATFORMS": "cpu"})
    _run_child(env)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = _run_child(dict(env, **{cc.ENV_DIR: str(tmp_path / "b")}))
    assert "/jax/compilation_cache/cache_hits" in moved["events"]
    assert "/jax/compilation_cache/cache_misses" not in moved["events"]
    assert _entries(tmp_path / "b") == _entries(tmp_path / "a")


def test_damaged_entry_is_replaced(tmp_path):
    """A truncated entry: that run recompiles and rewrites it, so the next run hits again (jax alone would
    warn and recompile on every run)."""
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k not in (cc.ENV_SWITCH, "JAX_COMPILATION_CACHE_DIR")}
    env.update({cc.ENV_DIR: str(cache), "JAX_PLATFORMS": "cpu"})
    _run_child(env)
    entries = [p for p in cache.iterdir() if p.is_file() and p.name.endswith("-cache")]
    assert entries
    for p in entries:
        p.write_bytes(p.read_bytes()[:40])  # truncated
    repaired = _run_child(env)
    assert "/jax/compilation_cache/cache_misses" in repaired["events"]
    assert all(p.stat().st_size > 1000 for p in entries)  # rewritten whole (the executable, a few kB)
    warm = _run_child(env)
    assert "/jax/compilation_cache/cache_hits" in warm["events"]
    assert "/jax/compilation_cache/cache_misses" not in warm["events"]
