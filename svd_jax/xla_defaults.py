"""XLA:CPU settings that make svd-jax faster on CPU, applied before jax starts (imports no jax).

XLA's CPU backend fuses convolutions into YNNPACK kernels by default; for the SVD UNet's convolutions its own
emitters are faster on the machine measured (benchmarks/results_unet_vs_diffusers.txt: the full-size UNet
forward, fp32, 2 cores: 4874 ms with XLA's default, 3622 ms with the fusions off; 1.43x vs 1.74x diffusers eager).

:func:`apply_cpu_defaults` adds ``--xla_cpu_experimental_ynn_fusion_type=`` (the fusions off) to ``XLA_FLAGS``:

* only while jax's backends are not started yet (XLA reads its flags once, when the first backend starts);
* only where the computation will run on the CPU: ``JAX_PLATFORMS`` is unset or starts with ``cpu``, and no
  accelerator plugin (jax's CUDA / ROCm plugins, libtpu) is installed;
* only if this jaxlib knows the flag (XLA aborts on an unknown flag): checked once per jaxlib version in a
  subprocess, the answer cached in ``$XDG_CACHE_HOME/svd-jax`` (``~/.cache/svd-jax``);
* not if ``XLA_FLAGS`` already sets it, and never with ``SVD_JAX_CPU_DEFAULTS=0`` (XLA's defaults).

``svd-jax generate`` / ``train`` and the notebooks call it; in your own program call it before the first jax
computation::

    from svd_jax.xla_defaults import apply_cpu_defaults
    apply_cpu_defaults()
    import jax  # ... as usual
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
OPT_OUT = "SVD_JAX_CPU_DEFAULTS"
ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda11-plugin", "jax-rocm60-plugin",
                       "jax-rocm7-plugin", "libtpu", "libtpu-nightly", "jax-metal")


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # private, but the only way to ask; absent: assume started

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def _runs_on_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    for name in ACCELERATOR_PLUGINS:
        try:
            importlib.metadata.version(name)
            return False
        except importlib.metadata.PackageNotFoundError:
            continue
    return True


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "svd-jax" / "xla_flags.json"


def flag_is_known(flag: str = NO_YNN) -> bool:
    """Whether this jaxlib's XLA accepts ``flag`` (a subprocess starts jax's CPU backend with it, once per jaxlib
    version; the answer is cached)."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    key = f"{version} {flag}"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return bool(known[key])
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip(), JAX_PLATFORMS="cpu")
    try:
        ok = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env, timeout=120,
                            capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False  # not cached: try again next time
    known[key] = ok
    try:  # a cache that cannot be written costs one probe per run, nothing else
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass
    return ok


def apply_cpu_defaults() -> list[str]:
    """Add the CPU flags known to help svd-jax to ``XLA_FLAGS`` where the conditions in the module docstring hold.
    Returns the flags added (empty: nothing changed)."""
    if os.environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return []
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags or _backends_started() or not _runs_on_cpu():
        return []
    if not flag_is_known(NO_YNN):
        return []
    os.environ["XLA_FLAGS"] = (flags + " " + NO_YNN).strip()
    return [NO_YNN]
