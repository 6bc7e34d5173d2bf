"""A persistent XLA compilation cache, on by default.

The whole generation is one jitted program per static configuration; compiling the full-size SVD-XT one takes
minutes. JAX can keep compiled executables on disk and reload them in the next process (same program, same
jax/jaxlib, same devices), so a second ``svd-jax`` run, notebook restart or job on the same machine skips the
compile. :func:`enable_compile_cache` switches that on.

Where the cache lives, first match wins:

1. ``jax_compilation_cache_dir`` already configured by the user (``jax.config.update``, the
   ``JAX_COMPILATION_CACHE_DIR`` environment variable, ...): left as it is, with all the user's cache settings.
2. the ``path`` argument;
3. ``$SVD_JAX_CACHE_DIR``;
4. ``$XDG_CACHE_HOME/svd-jax/xla``, else ``~/.cache/svd-jax/xla``.

``SVD_JAX_COMPILE_CACHE=0`` (or ``false``/``no``/``off``) switches it off: nothing in jax's config is touched.

Remote caches (``gs://...``, shared by the hosts of a pod) are jax's business: set ``jax_compilation_cache_dir``
or ``JAX_COMPILATION_CACHE_DIR`` to the URL; this module then leaves it alone. The cache is not size-limited
(jax's limit, ``jax_compilation_cache_max_size``, needs the ``filelock`` package); delete the directory to clear it.

What a cache entry depends on: the program, the jax/jaxlib versions, the devices (kind and count) and XLA flags;
not on where the cache or the installation lives, so a cache folder can be copied or moved (baked into a VM
image, shared by the hosts of a pod) and still hit. jax's default also turns on XLA's GPU autotuning cache in a
folder inside the cache directory, whose absolute path then enters every key (a moved cache missed everything);
here that extra XLA cache is off (``jax_persistent_cache_enable_xla_caches="none"``) unless the user set it.

A damaged entry (a truncated or garbled file) is removed when jax fails to read it, so that this run's compile
writes it afresh and the next run is warm again (jax alone would warn and recompile on every run).

The cache is trusted code: anyone who can write to its directory can make this process run what they wrote
(see jax's guide to the persistent compilation cache). Do not point it at a directory others can write to.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

ENV_DIR = "SVD_JAX_CACHE_DIR"
ENV_SWITCH = "SVD_JAX_COMPILE_CACHE"
_OFF = ("0", "false", "no", "off")

# jax writes an entry only for programs that took at least this long to compile (its default is 1 s). The
# generation takes minutes, but the pipeline's small helper programs and every program on a slow-to-compile
# backend (TPU) are worth keeping too, and reading an entry back is cheaper than any compile.
MIN_COMPILE_TIME_SECS = 0.0
# -1: no lower bound on the entry size, and jax may not raise it for the file system behind the cache.
MIN_ENTRY_SIZE_BYTES = -1

# jax's default for its extra XLA caches: the GPU autotuning cache, in a folder under the cache directory.
_JAX_DEFAULT_XLA_CACHES = "xla_gpu_per_fusion_autotune_cache_dir"
_ENTRY_SUFFIX = "-cache"  # jax's file cache names an entry <key>-cache

_lock = threading.Lock()


def compile_cache_disabled() -> bool:
    """True when ``$SVD_JAX_COMPILE_CACHE`` switches the persistent compilation cache off."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF


def default_cache_dir() -> Path:
    """The directory used when no path is given: ``$SVD_JAX_CACHE_DIR``, else the user cache dir
    (``$XDG_CACHE_HOME/svd-jax/xla`` or ``~/.cache/svd-jax/xla``)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # the XDG spec's fallback
    return Path(base).expanduser() / "svd-jax" / "xla"


def _is_url(path) -> bool:
    return "://" in str(path)


def _get(name: str, default=None):
    # getattr, not jax.config.read: read() refuses options that also have a context manager (the cache dir).
    return getattr(jax.config, name, default)


def _set(name: str, value) -> bool:
    # Option names come and go between jax releases; a missing one is not worth failing the pipeline for.
    try:
        jax.config.update(name, value)
        return True
    except AttributeError:
        logger.debug("jax %s has no config option %s; not set", jax.__version__, name)
        return False


def _remove_damaged_entries_on_read() -> None:
    """Wrap jax's cache read so that an entry it cannot read is deleted (then rewritten by the compile that
    follows). jax's internals move between releases: where the hook does not fit, jax's behaviour is kept."""
    try:
        from jax._src import compilation_cache as jcc
    except ImportError:
        return
    read = getattr(jcc, "get_executable_and_time", None)
    if read is None or getattr(read, "_svd_jax_repairs", False):
        return

    def get_executable_and_time(cache_key, *args, **kwargs):
        try:
            return read(cache_key, *args, **kwargs)
        except Exception:
            current = _get("jax_compilation_cache_dir")  # the directory in use now (the user may move it)
            if not current or _is_url(current):
                raise
            entry = Path(current) / f"{cache_key}{_ENTRY_SUFFIX}"
            try:
                entry.unlink()
                logger.warning("removed the damaged compilation cache entry %s; this compile rewrites it", entry)
            except OSError:
                pass
            raise

    get_executable_and_time._svd_jax_repairs = True
    jcc.get_executable_and_time = get_executable_and_time


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Switch on JAX's persistent compilation cache, so compiled programs are reused by later processes.

    Args:
      path: the cache directory; default ``$SVD_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/svd-jax/xla`` or
        ``~/.cache/svd-jax/xla``. Created if missing.

    Returns:
      The local directory the cache uses, or ``None``: ``$SVD_JAX_COMPILE_CACHE=0``, the user turned jax's
      cache off (``jax_enable_compilation_cache=False``), the directory cannot be created, or the cache is a
      remote URL (one the user configured in jax stays on; one given here is refused with a warning).

    A cache directory the user already configured in jax is kept (and returned), whatever ``path`` says, and
    so are the user's other cache settings. Idempotent: after the first call the cache is configured, so later
    calls return the same directory. Call it before the first compile; a later call still works on this jax,
    but programs compiled before it were not written to disk.
    """
    if compile_cache_disabled():
        return None
    with _lock:
        if not _get("jax_enable_compilation_cache", True):  # the user turned jax's cache off: respect that
            return None
        current = _get("jax_compilation_cache_dir")
        if current:  # configured by the user, or by an earlier call: keep it
            return None if _is_url(current) else Path(current)
        if path is not None and _is_url(path) or path is None and _is_url(os.environ.get(ENV_DIR, "")):
            # Path() would mangle "gs://b/x" into "gs:/b/x"; jax reads URLs itself (see the module docstring)
            logger.warning("persistent compilation cache off: set JAX_COMPILATION_CACHE_DIR for a remote cache "
                           "(%s)", path if path is not None else os.environ[ENV_DIR])
            return None
        target = Path(path).expanduser() if path is not None else default_cache_dir()
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a read-only home: run without the cache rather than fail
            logger.warning("persistent compilation cache off: cannot create %s (%s)", target, e)
            return None
        target = target.resolve()
        _set("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
        _set("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
        if _get("jax_persistent_cache_enable_xla_caches") == _JAX_DEFAULT_XLA_CACHES:
            _set("jax_persistent_cache_enable_xla_caches", "none")  # keys free of the cache's path (docstring)
        if not _set("jax_compilation_cache_dir", str(target)):
            return None
        _remove_damaged_entries_on_read()
        try:
            # Older jax decides once, at the first compile, whether the cache is in use; if something compiled
            # before this call, that decision was "no dir, no cache". Resetting an uninitialised cache (there
            # was no dir, so there is none) only makes jax look again.
            from jax.experimental.compilation_cache import compilation_cache as cc

            cc.reset_cache()
        except (ImportError, AttributeError):
            pass
        logger.info("persistent compilation cache at %s", target)
        return target
