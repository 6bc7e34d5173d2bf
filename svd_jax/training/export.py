"""Exporting a fine-tuned UNet: a complete diffusers-layout pipeline folder, or the ``unet/`` folder alone.

* :func:`export_pipeline`: ``output_dir`` becomes a pipeline folder that diffusers
  (``StableVideoDiffusionPipeline.from_pretrained``, ``UNetSpatioTemporalConditionModel.from_pretrained(...,
  subfolder="unet")``) and svd-jax (``StableVideoDiffusionPipeline.from_pretrained``, ``svd-jax generate
  --model``) load: ``unet/`` holds the given parameters, every other component is copied from the base model.
* :func:`export_unet`: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (PyTorch names and layouts) of
  one UNet, written into a folder.

The parameters are checked against the module's parameter tree before anything is written, gathered to the host
one tensor at a time (``jax.device_get``: sharded arrays are fine when fully addressable) and streamed into the
safetensors file, so host memory stays near one tensor beyond the parameters themselves. No torch.

Nothing a user had is lost and no half-written folder is left: every component is built in a temporary sibling
directory inside ``output_dir`` and moved into place with ``os.replace`` only once all of them are complete;
``model_index.json`` is written last, atomically. Other entries of ``output_dir`` (``checkpoints/``,
``metrics.jsonl``) are left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..weights import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHTS,
    CheckpointError,
    Source,
    add_variant,
    check_class_name,
    flatten_shapes,
    path_to_torch_name,
    plan_conversion,
    resolve_pipeline_root,
    write_safetensors,
)

__all__ = ["UNET_CLASS_NAME", "export_pipeline", "export_unet", "unet_config"]

UNET_CLASS_NAME = "UNetSpatioTemporalConditionModel"
MODEL_INDEX = "model_index.json"

# Module fields that say how the Flax module computes, not what diffusers builds: never written to config.json.
_RUNTIME_FIELDS = ("parent", "name", "dtype", "param_dtype", "options", "forward_chunk_size", "forward_chunk_dim",
                   "resnet_eps")
_OUT_DTYPES = {np.dtype(d) for d in (np.float16, jnp.bfloat16, np.float32, np.float64)}


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

def _jsonable(v: Any) -> Any:
    """Tuples (nested too) -> lists, as the value reads back from JSON."""
    return json.loads(json.dumps(v))


def _architecture(unet) -> dict[str, Any]:
    """The module's diffusers config fields (every dataclass field but the runtime ones), JSON-typed."""
    return {f.name: _jsonable(getattr(unet, f.name)) for f in dataclasses.fields(unet)
            if f.name not in _RUNTIME_FIELDS}


def unet_config(unet, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The diffusers ``unet/config.json`` dict of the Flax module ``unet``.

    Args:
      unet: a :class:`svd_jax.models.UNetSpatioTemporalConditionModel`.
      base: a diffusers UNet config to start from (the base model's ``unet/config.json``): its keys are kept
        (``_diffusers_version`` and any others), and the architecture fields take the module's values where they
        differ (so the config always describes the parameters written). None: built from the module's fields,
        with ``"_class_name": "UNetSpatioTemporalConditionModel"``.

    Returns:
      A JSON-serialisable dict (lists, not tuples).
    """
    arch = _architecture(unet)
    if base is None:
        return {"_class_name": UNET_CLASS_NAME, **arch}
    check_class_name(base, UNET_CLASS_NAME, "the base model's unet/config.json")
    out = _jsonable(dict(base))
    defaults = {f.name: _jsonable(f.default) for f in dataclasses.fields(type(unet))
                if f.name in arch and f.default is not dataclasses.MISSING}
    for k, v in arch.items():
        # An absent key means the default: leave it absent when the module has that default too.
        if out.get(k, defaults.get(k, dataclasses.MISSING)) != v:
            out[k] = v
    return out


def _write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    _atomic_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _atomic_file(path: Path, write) -> None:
    """``write(tmp_path)`` to a temporary sibling of ``path``, then ``os.replace`` it onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------

def _out_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        d = np.dtype(jnp.dtype(dtype))
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r}: not a dtype; use 'float32', 'float16' or 'bfloat16'") from e
    if d not in _OUT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: the export writes floating-point weights; use 'float32', 'float16' "
                         "or 'bfloat16'")
    return d


@functools.lru_cache(maxsize=4)
def _cached_shapes(unet) -> dict[tuple[str, ...], tuple[int, ...]]:
    return flatten_shapes(unet.init_params_abstract())


def _module_shapes(unet) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{flax_path: shape}`` of the module's parameter tree (traced once per module: ~1 s for a UNet)."""
    try:
        return dict(_cached_shapes(unet))
    except TypeError:  # an unhashable module
        return flatten_shapes(unet.init_params_abstract())


def _checked_leaves(unet, params: Any) -> dict[tuple[str, ...], Any]:
    """Flat ``{flax_path: leaf}`` of ``params`` in the module's parameter order, after checking that the tree is
    exactly the module's (every path, every shape).

    Raises:
      CheckpointError naming the first mismatching parameter (missing, wrong shape, unexpected, not an array).
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:  # the variables dict {"params": ...}
        params = params["params"]
    expected = _module_shapes(unet)
    try:
        given = traverse_util.flatten_dict(params)
    except (TypeError, AttributeError) as e:
        raise CheckpointError(f"the UNet params are not a parameter tree (a nested dict of arrays): {e}") from e
    problems = []
    for path, shape in expected.items():
        name = "/".join(path)
        if path not in given:
            problems.append(f"missing parameter {name} (the module has shape {list(shape)})")
            continue
        leaf = given[path]
        if isinstance(leaf, jax.ShapeDtypeStruct) or not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            problems.append(f"parameter {name} is a {type(leaf).__name__}, not an array")
        elif tuple(leaf.shape) != shape:
            problems.append(f"parameter {name} has shape {list(leaf.shape)}, the module has {list(shape)}")
        elif np.dtype(leaf.dtype) not in _OUT_DTYPES:
            problems.append(f"parameter {name} has dtype {leaf.dtype}, not a floating-point dtype")
        elif not getattr(leaf, "is_fully_addressable", True):
            problems.append(f"parameter {name} is not fully addressable from this process (multi-host); gather "
                            "it first (jax.experimental.multihost_utils.process_allgather)")
    problems += [f"unexpected parameter {'/'.join(p)} (not in the module)" for p in given if p not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"the UNet params do not match the module: {problems[0]}{more}")
    return {p: given[p] for p in expected}


def _torch_specs(leaves: Mapping[tuple[str, ...], Any], dtype: np.dtype | None):
    """``[(pytorch_name, dtype, pytorch_shape, flax_path, flax->pytorch transform)]``, sorted by name, from the
    leaves' shapes only (nothing is gathered or allocated)."""
    out = []
    for path, leaf in leaves.items():
        name, fn = path_to_torch_name(path, len(leaf.shape))
        shape = fn(np.broadcast_to(np.zeros((), np.uint8), tuple(leaf.shape))).shape  # a view: no data
        out.append((name, dtype or np.dtype(leaf.dtype), tuple(shape), path, fn))
    return sorted(out, key=lambda s: s[0])


def export_unet(unet, unet_params: Any, folder: str | os.PathLike, *, dtype: Any = None,
                config: Mapping[str, Any] | None = None) -> Path:
    """Write one UNet in the diffusers layout: ``folder/config.json`` and
    ``folder/diffusion_pytorch_model.safetensors`` (PyTorch names and layouts: Linear ``(out, in)``, Conv2d
    ``OIHW``, Conv3d ``OIDHW``), loadable by diffusers' ``UNetSpatioTemporalConditionModel.from_pretrained`` and
    by svd-jax's.

    Args:
      unet: the Flax module (:class:`svd_jax.models.UNetSpatioTemporalConditionModel`).
      unet_params: its parameter tree (``module.apply({"params": unet_params}, ...)``; the ``{"params": ...}``
        variables dict is accepted too): jax arrays (sharded is fine when fully addressable) or numpy arrays,
        Flax layout (kernels ``(in, out)``, ``HWIO``, ``DHWIO``), each of the shape ``unet.init_params_abstract()``
        gives.
      folder: created if absent; files of the same names are replaced (each atomically), others left alone.
      dtype: None keeps each parameter's dtype; ``"float32"``, ``"float16"``, ``"bfloat16"`` (or a numpy/jax
        dtype) converts.
      config: the diffusers config to write (see :func:`unet_config`); None builds it from the module's fields.

    Returns:
      ``folder`` as a Path.

    Raises:
      CheckpointError naming the first parameter that does not match the module (before anything is written);
      ValueError for a dtype that is not a floating-point one.
    """
    out_dtype = _out_dtype(dtype)
    leaves = _checked_leaves(unet, unet_params)
    specs = _torch_specs(leaves, out_dtype)
    # The names and shapes written must load back onto the module's tree by the reading rules, exactly.
    plan_conversion(_module_shapes(unet), {s[0]: s[2] for s in specs},
                    what="the exported UNet state dict")
    cfg = unet_config(unet, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def arrays():
        for _, dt, _, path, fn in specs:
            host = np.asarray(jax.device_get(leaves[path]))  # gathers a sharded array: one tensor at a time
            yield np.ascontiguousarray(fn(host), dtype=dt)

    write_specs = [(name, dt, shape) for name, dt, shape, _, _ in specs]
    _atomic_file(folder / DIFFUSERS_WEIGHTS,
                 lambda tmp: write_safetensors(tmp, write_specs, arrays(), metadata={"format": "pt"}))
    _write_json_atomic(folder / CONFIG_NAME, cfg)
    return folder


# --------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------

def _components(index_path: Path) -> list[str]:
    """The component folder names ``model_index.json`` lists (``[library, class]`` entries, not ``[null, null]``)."""
    try:
        index = json.loads(index_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{index_path}: not valid JSON: {e}") from e
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: not a JSON object")
    return [k for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None]


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or inside it (both resolved)."""
    return a == b or b in a.parents


def _check_no_overlap(root: Path, out: Path, components: list[str]) -> None:
    r, o = root.resolve(), out.resolve()
    if r == o:
        raise CheckpointError(f"{out}: the output folder is the base model's folder; exporting would overwrite "
                              "the base: choose another output folder")
    for c in components:
        if _inside(o, r / c):
            raise CheckpointError(f"{out}: the output folder is inside the base model's {c}/ folder, which is copied")
        if _inside(r, o / c):
            raise CheckpointError(f"{root}: the base model is inside {out / c}, which the export replaces")


def _copy_component(src: Path, dst: Path) -> None:
    """Copy the folder ``src`` into the (existing, empty) ``dst``, following symlinks (a hub snapshot's files
    are links into its blob store: their contents are copied)."""
    shutil.copytree(src, dst, symlinks=False, dirs_exist_ok=True)


def export_pipeline(base_model: str | os.PathLike, unet, unet_params: Any, output_dir: str | os.PathLike, *,
                    dtype: Any = None, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False, variant: str | None = None) -> Path:
    """Make ``output_dir`` a complete diffusers pipeline folder: the fine-tuned UNet plus the base's other
    components.

    ``output_dir/unet/`` gets ``config.json`` (the base's ``unet/config.json``, its keys kept; see
    :func:`unet_config`) and ``diffusion_pytorch_model.safetensors`` (``unet_params`` in PyTorch names and
    layouts, :func:`export_unet`); nothing else of the base's ``unet/`` (its weights, variants included, are
    stale). Every other component ``model_index.json`` lists (``vae/``, ``image_encoder/``, ``scheduler/``,
    ``feature_extractor/``) is copied as it is, file contents (hub-snapshot links followed), and
    ``model_index.json`` is copied last. The result loads with diffusers'
    ``StableVideoDiffusionPipeline.from_pretrained(output_dir)`` and
    ``UNetSpatioTemporalConditionModel.from_pretrained(output_dir, subfolder="unet")``, and with svd-jax's
    ``StableVideoDiffusionPipeline.from_pretrained(output_dir)`` / ``svd-jax generate --model output_dir``.

    Args:
      base_model: the pipeline fine-tuned from: a local pipeline folder or a hub repo id (resolved with
        :class:`svd_jax.weights.Source` / :func:`svd_jax.weights.resolve_pipeline_root`: a hub repo's files
        are downloaded, or read from the cache, with only the files a pipeline reads).
      unet: the Flax module (:class:`svd_jax.models.UNetSpatioTemporalConditionModel`).
      unet_params: its parameter tree, each leaf of the module's shape (see :func:`export_unet`).
      output_dir: created if absent; may hold other things (``checkpoints/``, ``metrics.jsonl``), which are left
        alone. Components of an earlier export are replaced, each only once its new version is complete.
      dtype: the UNet weights' dtype: None keeps the params' dtype; ``"float32"``, ``"float16"``,
        ``"bfloat16"`` converts. The copied components keep theirs.
      revision, cache_dir, local_files_only: for a hub repo id (``huggingface_hub``).
      variant: which weights of a hub repo's components to fetch (``"fp16"``: only ``*.fp16.safetensors``). The
        UNet is then also linked under that variant's name (``diffusion_pytorch_model.fp16.safetensors``, the
        same file), so the export loads with ``variant=variant`` as the base did, and without a variant where
        the copied components have their default weights too (a hub download with a variant has only those).

    Returns:
      ``output_dir`` as a Path.

    Raises:
      CheckpointError before anything is written: ``base_model`` is not a pipeline folder (no
      ``model_index.json``, no ``unet/config.json``), ``output_dir`` is the base's folder (or overlaps a folder
      that is copied or replaced), or the params do not match the module (naming the first parameter).
      A failure while writing leaves ``output_dir`` as it was (temporary folders removed).

    A base in svd-jax's converted Flax layout (``python -m convert``) is copied as it is: svd-jax loads the
    export, diffusers does not read those components.
    """
    source = Source(base_model, revision, cache_dir, local_files_only)
    if source.local is None and source.file(MODEL_INDEX) is None:  # a hub repo: checked before downloading
        raise CheckpointError(f"{base_model}: no {MODEL_INDEX}; not a diffusers pipeline repo")
    root = source.local if source.local is not None else resolve_pipeline_root(
        base_model, variant, revision, cache_dir, local_files_only)
    index_path = root / MODEL_INDEX
    if not index_path.is_file():
        raise CheckpointError(f"{root}: no {MODEL_INDEX}; not a diffusers pipeline folder (export_pipeline needs the "
                              "whole pipeline the UNet was fine-tuned from)")
    components = _components(index_path)
    if "unet" not in components:
        raise CheckpointError(f"{index_path} lists no unet component (found {components})")
    missing = [c for c in components if not (root / c).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: {MODEL_INDEX} lists {missing}, but there is no such folder")
    out = Path(output_dir).expanduser()
    _check_no_overlap(root, out, components)
    in_the_way = [str(out / c) for c in components if (out / c).exists() and not (out / c).is_dir()]
    if in_the_way or (out / MODEL_INDEX).is_dir():
        raise CheckpointError(f"{out}: {in_the_way or [str(out / MODEL_INDEX)]} would be replaced by a component "
                              "but is not a folder (model_index.json: a file); move it away first")
    base_cfg_path = root / "unet" / CONFIG_NAME
    if not base_cfg_path.is_file():
        raise CheckpointError(f"{root}/unet: no {CONFIG_NAME}")
    try:
        base_cfg = json.loads(base_cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{base_cfg_path}: not valid JSON: {e}") from e
    cfg = unet_config(unet, base_cfg)
    _out_dtype(dtype)
    _checked_leaves(unet, unet_params)  # before anything is created

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for c in components:
            staged[c] = Path(tempfile.mkdtemp(dir=out, prefix=f".{c}.", suffix=".export-tmp"))
            if c == "unet":
                export_unet(unet, unet_params, staged[c], dtype=dtype, config=cfg)
                if _jsonable(cfg) == _jsonable(base_cfg):  # unchanged: the base's bytes
                    shutil.copyfile(base_cfg_path, staged[c] / CONFIG_NAME)
                if variant:
                    _link_or_copy(staged[c] / DIFFUSERS_WEIGHTS, staged[c] / add_variant(DIFFUSERS_WEIGHTS, variant))
            else:
                _copy_component(root / c, staged[c])
        for c in components:  # every new component is complete: swap them in
            _swap_in(staged.pop(c), out / c)
        _atomic_file(out / MODEL_INDEX, lambda tmp: shutil.copyfile(index_path, tmp))
    except BaseException:
        for d in staged.values():
            shutil.rmtree(d, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: what we created, nothing else
        raise
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _swap_in(new: Path, dst: Path) -> None:
    """Move the complete folder ``new`` onto ``dst``; an existing ``dst`` is moved aside first and removed only
    once ``new`` is in place (until then it survives under a hidden name next to it)."""
    old = None
    if dst.is_symlink():
        dst.unlink()  # a link: only the link goes, not what it points to
    elif dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".export-old"))
        os.replace(dst, old / dst.name)
    os.replace(new, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
