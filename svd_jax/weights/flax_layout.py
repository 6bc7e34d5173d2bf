"""The converted Flax layout (written by ``python -m convert``, svd_jax/convert.py): one safetensors file keyed by
Flax path (``down_blocks_0/resnets_0/conv1/kernel``), every tensor already in the Flax layout and in one dtype,
and a ``flax_manifest.json`` beside it. Here: its names and version, the manifest check, the key that lets a
load trust the converter's check, and the loader, which reads tensor by tensor (or slice by slice on a mesh)
straight from the file with no renaming or transposing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .errors import CheckpointError, raise_mismatches
from .safetensors_io import (
    TensorInfo,
    _aligned_copy,
    _Scratch,
    read_safetensors_header,
    read_tensor,
)
from .torch_layout import flatten_shapes

__all__ = [
    "FLAX_DTYPES", "FLAX_FORMAT", "FLAX_FORMAT_VERSION", "FLAX_MANIFEST", "FLAX_WEIGHTS", "load_flax_params",
    "model_key", "read_flax_manifest", "tensors_digest",
]

# Bump the version whenever what a file means changes (names, layouts, manifest fields, or the parameter tree the
# models build from a config), so that old files are refused instead of misread.
FLAX_MANIFEST = "flax_manifest.json"
FLAX_WEIGHTS = "flax_params.safetensors"
FLAX_FORMAT = "svd-jax-flax"
FLAX_FORMAT_VERSION = 1
FLAX_DTYPES = ("float32", "bfloat16", "float16")


def model_key(class_name: str, config: Mapping[str, Any]) -> str:
    """A digest of what decides a converted file's fit to a model: the Flax format version, the model class and
    its config (canonical JSON: key order and spacing do not matter). It reads no file.

    The converter checks the file it writes against the tree ``jax.eval_shape`` gives for this class and config,
    and records this key in the manifest with the file's :func:`tensors_digest`. When both still match at load
    time, the file is that tree, so :func:`load_flax_params` skips the trace (about 2 s for the full-size UNet on
    CPU, as long as reading its 3 GB); any difference falls back to checking every tensor against the model.

    The model code is not in the key, and that is safe: code that changes the parameter tree a config gives
    changes what a converted file means. Such a change is caught by the full-size key-list tests (every tensor of
    the real SVD-XT components against the Flax tree: tests/test_fullsize.py, tests/test_unet.py) and must bump
    :data:`FLAX_FORMAT_VERSION`, which is in the key (and makes :func:`read_flax_manifest` refuse older files).
    Code changes that keep the tree (comments, refactors, numerics) keep the fast path, as they should.
    """
    blob = json.dumps([FLAX_FORMAT, FLAX_FORMAT_VERSION, class_name, config], sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """A digest of a file's tensor names, shapes and dtypes, from ``{name: anything with .shape and .dtype}``
    (the header entries of :func:`read_safetensors_header`, arrays, or ``jax.ShapeDtypeStruct`` leaves)."""
    items = sorted((k, [int(d) for d in v.shape], np.dtype(v.dtype).name) for k, v in tensors.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def read_flax_manifest(path: str | os.PathLike, class_name: str | None = None) -> dict:
    """Read and check a ``flax_manifest.json``: format name and version, dtype, and (if given) the model class.

    Returns:
      The manifest dict (``format``, ``format_version``, ``converter_version``, ``class_name``, ``source``,
      ``variant``, ``dtype``, ``num_tensors``, ...).
    """
    path = Path(path)
    reconvert = "convert the original weights again with `python -m convert SRC DST`"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON manifest ({e}); {reconvert}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FLAX_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FLAX_FORMAT!r}; {reconvert}")
    version = manifest.get("format_version")
    if version != FLAX_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r}, but this svd-jax reads version {FLAX_FORMAT_VERSION} "
            f"(written by converter {manifest.get('converter_version')!r}); {reconvert}"
        )
    if manifest.get("dtype") not in FLAX_DTYPES:
        raise CheckpointError(f"{path}: dtype {manifest.get('dtype')!r}, expected one of {list(FLAX_DTYPES)}")
    if not isinstance(manifest.get("num_tensors"), int):
        raise CheckpointError(f"{path}: num_tensors {manifest.get('num_tensors')!r} is not an int; {reconvert}")
    found = manifest.get("class_name")
    if class_name is not None and found != class_name:
        raise CheckpointError(f"{path}: converted from a {found} checkpoint, not {class_name} (wrong subfolder?)")
    return manifest


def load_flax_params(
    abstract_params: Any,
    weights: str | os.PathLike,
    manifest: Mapping[str, Any],
    dtype: Any = jnp.float32,
    *,
    what: str = "checkpoint",
    to_device: bool = True,
    sharding_fn: Callable[[tuple[int, ...]], Any] | None = None,
    key: str | None = None,
) -> dict:
    """Fill a Flax parameter tree from a Flax-layout safetensors file (keys ``a/b/kernel``), strictly.

    Args:
      abstract_params: the module's parameter tree (``jax.ShapeDtypeStruct``s from ``jax.eval_shape``), or a
        function returning it, called only when the file has to be checked against it (see ``key``).
      weights: the ``flax_params.safetensors`` file.
      manifest: its checked manifest (:func:`read_flax_manifest`); the file must hold ``num_tensors`` tensors,
        every one of dtype ``manifest["dtype"]``.
      dtype: the parameter dtype; when it differs from the file's, each tensor (or slice) is cast as it is read.
      to_device: return ``jax.Array``s (default) or numpy arrays.
      sharding_fn: shape -> ``jax.sharding.Sharding``: ``jax.make_array_from_callback`` gives each device its
        own slice, copied out of the file's bytes; no tensor is assembled on one device.
      key: the model's :func:`model_key`. When it equals the manifest's and the file's tensors (names, shapes,
        dtypes) still have the manifest's :func:`tensors_digest`, the converter's check against this same model
        stands and ``abstract_params`` is not needed; otherwise every tensor is checked against it.

    Nothing is renamed or transposed. Tensors are read one at a time (:func:`read_tensor`), so the process holds
    the loaded parameters plus about one tensor; with ``sharding_fn``, a process reads only the rows of the
    leading axis its own devices need, and each device's slice is copied out of those rows.

    Raises:
      CheckpointError when the file does not match its manifest (tensor count, dtype), or the model (every
      missing, unexpected and wrong-shaped tensor listed).
    """
    infos, _ = read_safetensors_header(weights)
    file_dtype = np.dtype(jnp.dtype(manifest["dtype"]))
    if len(infos) != manifest["num_tensors"]:
        raise CheckpointError(f"{weights}: {len(infos)} tensors, but its manifest says {manifest['num_tensors']} "
                              "(the manifest is from another conversion, or the file was edited); convert again")
    wrong = [f"{k} ({v.dtype})" for k, v in infos.items() if v.dtype != file_dtype]
    if wrong:
        raise CheckpointError(
            f"{weights}: its manifest says dtype {manifest['dtype']}, but {len(wrong)} tensor(s) are not: "
            f"{wrong[:5]}{' ...' if len(wrong) > 5 else ''} (the manifest is from another conversion); convert again")

    # Everything is checked before any byte of data is read.
    checked = (key is not None and manifest.get("model_key") == key
               and manifest.get("tensors_digest") == tensors_digest(infos))
    if not checked:
        tree = abstract_params() if callable(abstract_params) else abstract_params
        target = {"/".join(p): s for p, s in flatten_shapes(tree).items()}
        mismatched = [f"{k}: expected shape {list(target[k])}, found {list(v.shape)}"
                      for k, v in infos.items() if k in target and tuple(v.shape) != target[k]]
        unexpected = [f"{k} {list(v.shape)}" for k, v in infos.items() if k not in target]
        missing = [f"{k} {list(s)}" for k, s in target.items() if k not in infos]
        raise_mismatches(what, mismatched, unexpected, missing,
                         hint="\n(converted from another config? this folder's config.json must be the one converted)")

    np_dtype = np.dtype(jnp.dtype(dtype))
    flat = {}
    scratch = _Scratch()  # for bytes that are copied out right away (casts, slices)
    with open(weights, "rb", buffering=0) as f:
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):  # sequential reads
            if sharding_fn is not None:
                arr = _load_sharded(f, info, sharding_fn(info.shape), np_dtype, scratch)
            elif info.dtype == np_dtype:
                host = read_tensor(f, info)
                arr = jax.device_put(host) if to_device else host  # adopted as is on CPU
            else:
                host = _aligned_copy(read_tensor(f, info, buffer=scratch.get(info.nbytes)), np_dtype)
                arr = jax.device_put(host) if to_device else host
            flat[tuple(name.split("/"))] = arr
    return traverse_util.unflatten_dict(flat)


def _load_sharded(f: BinaryIO, info: TensorInfo, sharding: Any, dtype: np.dtype, scratch: _Scratch) -> jax.Array:
    # The rows of the leading axis that this process's devices need (all of them when the split is along another
    # axis, or replicated) are read once; every device gets its slice copied (and cast) out of them.
    shape = info.shape
    indices = list(sharding.addressable_devices_indices_map(shape).values())
    if len(shape) == 0:
        lo, hi = 0, 0
        rows = None
    else:
        spans = [(idx[0] if idx else slice(None)).indices(shape[0])[:2] for idx in indices]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        rows = (lo, hi)
    whole = len(indices) == 1 and (rows is None or rows == (0, shape[0])) and info.dtype == dtype
    if whole and all(s.indices(n)[:2] == (0, n) for s, n in zip(indices[0], shape)):
        host = read_tensor(f, info)  # one device takes it all: its own buffer, no second copy
        return jax.make_array_from_callback(shape, sharding, lambda idx: host)
    host = read_tensor(f, info, rows, buffer=scratch.get(info.nbytes))

    def slice_of(idx):
        if rows is not None and idx:
            a, b = idx[0].indices(shape[0])[:2]
            idx = (slice(a - lo, b - lo),) + tuple(idx[1:])
        return _aligned_copy(host[idx], dtype)

    return jax.make_array_from_callback(shape, sharding, slice_of)


