"""Diffusers/transformers safetensors checkpoints -> Flax parameter trees.

Three layers, each usable on its own:

* :func:`resolve_checkpoint` finds ``config.json`` and the safetensors file(s) of one component, in a local
  folder (what ``save_pretrained`` writes, or a hub snapshot with ``subfolder``) or a hub repo id (through
  ``huggingface_hub``, downloading only the files needed).
* :func:`read_safetensors` memory-maps a safetensors file into numpy arrays (no pickle, no torch) and checks
  its header against the file, so a truncated or corrupt file is reported, not misread.
* :func:`plan_conversion` maps every checkpoint tensor name and shape onto the Flax parameter tree by a few
  rules (rename, OIHW->HWIO, OIDHW->DHWIO, Linear transpose, norm weight->scale), strictly both ways; the plan
  needs only shapes, so full-size coverage is checkable on abstract trees. :func:`load_params` executes it.
* The Flax layout (written by ``python -m convert``): one safetensors file keyed by Flax path, already in the
  Flax layout and one dtype, and a ``flax_manifest.json``. :func:`load_flax_params` checks it as strictly and
  loads it tensor by tensor (or slice by slice on a mesh) straight from the file, with no renaming or transposing.

Flax paths mirror the PyTorch names: ``down_blocks.0.resnets.1.conv1.weight`` lives at
``down_blocks_0/resnets_1/conv1/kernel``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

__all__ = [
    "CheckpointError",
    "CheckpointFiles",
    "ConversionPlan",
    "FLAX_FORMAT",
    "FLAX_FORMAT_VERSION",
    "FLAX_MANIFEST",
    "FLAX_WEIGHTS",
    "PretrainedMixin",
    "TensorInfo",
    "flatten_shapes",
    "load_flax_params",
    "load_params",
    "model_key",
    "plan_conversion",
    "read_flax_manifest",
    "read_safetensors",
    "read_safetensors_header",
    "read_tensor",
    "resolve_checkpoint",
    "tensors_digest",
    "write_safetensors",
]

CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

# The Flax layout written by ``python -m convert`` (svd_jax/convert.py). Bump the version whenever what a file
# means changes (names, layouts, manifest fields), so that old files are refused instead of misread.
FLAX_MANIFEST = "flax_manifest.json"
FLAX_WEIGHTS = "flax_params.safetensors"
FLAX_FORMAT = "svd-jax-flax"
FLAX_FORMAT_VERSION = 1
FLAX_DTYPES = ("float32", "bfloat16", "float16")

# Legacy names of diffusers' deprecated VAE attention blocks (ModelMixin._fix_state_dict_keys_on_load).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


class CheckpointError(ValueError):
    """A checkpoint folder, file, config or tensor does not match what the model needs."""


# --------------------------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """Where one component's files are: its config and its safetensors files (one, or the shards of an index)."""

    config: Path
    weights: tuple[Path, ...]
    source: str  # human-readable origin, for error messages
    manifest: Path | None = None  # set for the Flax layout (``flax_manifest.json``); weights is then one file


def add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` + ``fp16`` -> ``model.fp16.safetensors`` (the diffusers/transformers convention)."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def _candidate_names(weights_names: Sequence[str], variant: str | None) -> list[str]:
    names = []
    for base in weights_names:
        names.append(add_variant(base, variant))
        names.append(add_variant(base + ".index.json", variant))
    return names


_LAYOUTS = (f"a diffusers/transformers component folder ({CONFIG_NAME} + safetensors weights) or a converted Flax "
            f"folder ({CONFIG_NAME} + {FLAX_MANIFEST} + {FLAX_WEIGHTS})")


def _index_shards(index_path: Path) -> list[str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
    return sorted(set(weight_map.values()))


def resolve_checkpoint(
    path_or_repo: str | os.PathLike,
    subfolder: str | None = None,
    *,
    weights_names: Sequence[str] = (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS),
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> CheckpointFiles:
    """Find ``config.json`` and the safetensors weights of one component.

    Args:
      path_or_repo: a local folder, or a hub repo id such as ``stabilityai/stable-video-diffusion-img2vid-xt``.
      subfolder: the component's folder inside it (``unet``, ``vae``, ``image_encoder``), or None.
      weights_names: accepted base file names, in order of preference; each may also be sharded
        (``<name>.index.json``) and take the ``variant`` (``diffusion_pytorch_model.fp16.safetensors``).
      variant: e.g. ``"fp16"``. When given, only variant files are accepted (an absent variant is an error,
        not a silent fallback to other weights).
      revision, cache_dir, local_files_only: passed to ``huggingface_hub`` for repo ids.

    Returns:
      CheckpointFiles with the config path and the weight file paths; for a converted folder (Flax layout, it
      has a ``flax_manifest.json``) also the manifest path, and the weights are its ``flax_params.safetensors``.
    """
    candidates = _candidate_names(weights_names, variant)
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        where = str(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{local} has no subfolder {subfolder!r}")
        config = folder / CONFIG_NAME
        if not config.is_file():
            raise CheckpointError(f"{where}: no {CONFIG_NAME}, so neither layout: {_LAYOUTS}; found "
                                  f"{sorted(x.name for x in folder.iterdir()) or 'an empty folder'}")
        if (folder / FLAX_MANIFEST).is_file():  # the manifest decides: a converted folder is read as one
            weights = folder / FLAX_WEIGHTS
            if not weights.is_file():
                raise CheckpointError(f"{where}: has {FLAX_MANIFEST} but no {FLAX_WEIGHTS} (incomplete copy or "
                                      "conversion?); convert the original weights again with `python -m convert`")
            return CheckpointFiles(config, (weights,), where, folder / FLAX_MANIFEST)
        for name in candidates:
            p = folder / name
            if p.is_file():
                if name.endswith(".index.json"):
                    shards = [folder / s for s in _index_shards(p)]
                    missing = [str(s) for s in shards if not s.is_file()]
                    if missing:
                        raise CheckpointError(f"{p} lists shard(s) that are missing: {missing}")
                    return CheckpointFiles(config, tuple(shards), where)
                return CheckpointFiles(config, (p,), where)
        present = sorted(x.name for x in folder.iterdir() if ".safetensors" in x.name or x.suffix == ".bin")
        what = f"variant {variant!r} " if variant else ""
        hint = ". Pass variant=None to load the default weights" if variant and present else ""
        if FLAX_WEIGHTS in present:
            hint += f". {FLAX_WEIGHTS} without {FLAX_MANIFEST} is an incomplete conversion: convert again"
        raise CheckpointError(
            f"{where}: no {what}safetensors weights; looked for {candidates}, found {present or 'none'}{hint} "
            f"(expected {_LAYOUTS})"
        )
    if Path(path_or_repo).is_absolute() or str(path_or_repo).startswith((".", "~")) or str(path_or_repo).count("/") > 1:
        raise CheckpointError(f"{path_or_repo}: no such folder (and not a hub repo id 'owner/name')")
    return _resolve_hub(str(path_or_repo), subfolder, candidates, variant, revision, cache_dir, local_files_only)


def _resolve_hub(repo_id, subfolder, candidates, variant, revision, cache_dir, local_files_only) -> CheckpointFiles:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    def fetch(name: str) -> Path | None:
        try:
            return Path(
                hf_hub_download(
                    repo_id, name, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            )
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None

    where = f"{repo_id}" + (f"/{subfolder}" if subfolder else "")
    try:
        config = fetch(CONFIG_NAME)
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"{repo_id}: not a local folder and not a hub repository you can access") from e
    if config is None:
        raise CheckpointError(f"{where}: no {CONFIG_NAME} (offline, or not a component folder)")
    manifest = fetch(FLAX_MANIFEST)  # a converted (Flax layout) repo
    if manifest is not None:
        weights = fetch(FLAX_WEIGHTS)
        if weights is None:
            raise CheckpointError(f"{where}: has {FLAX_MANIFEST} but {FLAX_WEIGHTS} could not be fetched")
        return CheckpointFiles(config, (weights,), where, manifest)
    for name in candidates:
        p = fetch(name)
        if p is None:
            continue
        if name.endswith(".index.json"):
            shards = []
            for s in _index_shards(p):
                sp = fetch(s)
                if sp is None:
                    raise CheckpointError(f"{where}: index {name} lists shard {s}, which could not be fetched")
                shards.append(sp)
            return CheckpointFiles(config, tuple(shards), where)
        return CheckpointFiles(config, (p,), where)
    what = f"variant {variant!r} " if variant else ""
    raise CheckpointError(f"{where}: no {what}safetensors weights; looked for {candidates}")


# --------------------------------------------------------------------------------------------------------------
# Reading and writing safetensors (memory-mapped, validated; streamed)
# --------------------------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape, and where its bytes are (absolute file offsets)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # first byte in the file
    nbytes: int


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: ``({name: TensorInfo}, metadata)``; no tensor data is read.

    Every tensor's byte range must lie inside the file and its size equal dtype x shape, so a truncated or corrupt
    file raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: header is not valid JSON (corrupt or not safetensors): {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object (corrupt or not safetensors)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {name!r}: {info!r}") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: {name!r} occupies {end - begin} bytes but {info['dtype']}{list(shape)} needs {nbytes}")
        if end > data_len:
            raise CheckpointError(
                f"{path}: {name!r} ends at byte {data_start + end} but the file has {size} bytes (truncated download?)"
            )
        out[name] = TensorInfo(dtype, shape, data_start + begin, nbytes)
    return out, metadata


def read_tensor(
    f: BinaryIO, info: TensorInfo, rows: tuple[int, int] | None = None, buffer: np.ndarray | None = None
) -> np.ndarray:
    """Read one tensor, or the rows ``[lo, hi)`` of its leading axis, from an open safetensors file.

    Args:
      f: the file, opened ``"rb"``.
      info: the tensor's entry from :func:`read_safetensors_header`.
      rows: ``(lo, hi)`` to read only ``tensor[lo:hi]`` (shape ``(hi - lo,) + shape[1:]``); None for all of it.
      buffer: a uint8 array of at least the bytes read, to read into (a caller's reusable scratch space, for
        data copied out right away); the result is then a view of it.

    Returns:
      The tensor in the file's dtype: a new 64-byte-aligned array (jax on CPU adopts such a buffer without
      copying it), or a view of ``buffer``.

    Plain reads, not a memory map: on the VMs measured, faulting a map's pages in cost 6x the time of reading
    the same bytes (a 3 GB UNet from the page cache: 6.2 s mapped, 0.9 s read), and a map keeps every page read
    resident in the process.
    """
    shape = info.shape
    start, nbytes = info.start, info.nbytes
    if rows is not None and len(shape) > 0:
        row = math.prod(shape[1:]) * info.dtype.itemsize
        lo, hi = rows
        shape = (hi - lo,) + tuple(shape[1:])
        start, nbytes = info.start + lo * row, (hi - lo) * row
    if buffer is None:
        out = _aligned_empty(shape, info.dtype)
    else:
        out = buffer[:nbytes].view(info.dtype).reshape(shape)
    buf = out.reshape(-1).view(np.uint8)
    f.seek(start)
    done = 0
    while done < nbytes:  # one read() returns at most ~2 GB on Linux
        n = f.readinto(buf[done:])
        if not n:
            raise CheckpointError(f"{f.name}: ends inside a tensor's data (truncated while loading?)")
        done += n
    return out


_ALIGN = 64
_MAP_MIN = 1 << 20
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0) | getattr(mmap, "MAP_POPULATE", 0)


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    # On CPU, jax.device_put adopts a 64-byte-aligned numpy buffer as is, but copies any other one again at about
    # 1-2 GB/s (jnp.asarray always copies): seconds for a 3 GB UNet. Big buffers are fresh pre-faulted anonymous
    # maps (page-aligned): on the VMs measured, numpy's large allocations (advised as huge pages, compacted on
    # fault) took 1.2 s per GB to first touch, a pre-faulted map 0.35 s.
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _MAP_MIN and _MAP_FLAGS & getattr(mmap, "MAP_ANONYMOUS", 0):
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=_MAP_FLAGS), np.uint8).view(dtype).reshape(shape)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    begin = -raw.ctypes.data % _ALIGN
    return raw[begin : begin + nbytes].view(dtype).reshape(shape)


def _aligned_copy(src: np.ndarray, dtype: Any) -> np.ndarray:
    """``src`` copied (cast to ``dtype``) into a new 64-byte-aligned array."""
    out = _aligned_empty(src.shape, dtype)
    np.copyto(out, src, casting="unsafe")
    return out


class _Scratch:
    # One read buffer reused for bytes that are copied out right away: its pages are faulted in once, not per
    # tensor. Grown by replacement, so views handed out earlier stay valid.
    def __init__(self):
        self._buf = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self._buf = np.empty(nbytes, np.uint8)
        return self._buf


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map a safetensors file: ``{name: read-only numpy view}``, nothing copied until used.

    The header is checked against the file (:func:`read_safetensors_header`), so a truncated or corrupt file
    raises :class:`CheckpointError` naming the file.
    """
    infos, _ = read_safetensors_header(path)
    if not any(i.nbytes for i in infos.values()):
        return {k: np.zeros(i.shape, i.dtype) for k, i in infos.items()}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return {k: raw[i.start : i.start + i.nbytes].view(i.dtype).reshape(i.shape) for k, i in infos.items()}


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[tuple[str, Any, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream tensors into a safetensors file, one at a time: the header is written first from ``specs``.

    Args:
      path: the file to write.
      specs: ``(name, dtype, shape)`` of every tensor, in file order.
      arrays: the tensors in the same order, each produced when needed (a generator), so that peak memory is one
        tensor, not the model. Each must match its spec's dtype and shape.
      metadata: string key/values stored in the header's ``__metadata__``.

    Returns:
      The file size in bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        count = 0
        for (name, dtype, shape), arr in zip(specs, arrays):
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise ValueError(
                    f"{name}: got {arr.dtype}{list(arr.shape)}, the header says {np.dtype(dtype)}{list(shape)}")
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # bytes (bf16 has no buffer format)
            count += 1
        if count != len(specs):
            raise ValueError(f"{path}: {len(specs)} tensors in the header but {count} arrays were given")
    return 8 + len(blob) + offset


def read_checkpoint(files: Iterable[str | os.PathLike]) -> dict[str, np.ndarray]:
    """All tensors of one or several (sharded) safetensors files; a name in two shards is an error."""
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_safetensors(f).items():
            if k in tensors:
                raise CheckpointError(f"tensor {k!r} appears in more than one shard ({f})")
            tensors[k] = v
    return tensors


# --------------------------------------------------------------------------------------------------------------
# Conversion rules
# --------------------------------------------------------------------------------------------------------------

FlaxPath = tuple[str, ...]


def torch_name_to_path(name: str) -> FlaxPath:
    """``down_blocks.0.resnets.1.conv1.weight`` -> ``("down_blocks_0", "resnets_1", "conv1", "weight")``."""
    out: list[str] = []
    for part in name.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


# A layout transform: (forward on arrays, forward on shapes). The array transform turns the PyTorch layout
# into the Flax one.
@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    shape_fn: Callable[[tuple[int, ...]], tuple[int, ...]]


def _perm(name, axes):
    return Transform(name, lambda a: np.transpose(a, axes), lambda s: tuple(s[i] for i in axes))


IDENTITY = Transform("as is", lambda a: a, lambda s: tuple(s))
LINEAR = _perm("Linear (out,in)->(in,out)", (1, 0))
CONV2D = _perm("Conv2d OIHW->HWIO", (2, 3, 1, 0))
CONV3D = _perm("Conv3d OIDHW->DHWIO", (2, 3, 4, 1, 0))
CONV1X1_AS_LINEAR = Transform(
    "1x1 Conv2d (O,I,1,1)->(I,O)", lambda a: np.transpose(a[:, :, 0, 0]), lambda s: (s[1], s[0]) if s[2:] == (1, 1) else (-1,)
)


def _rule_candidates(path: FlaxPath, ndim: int) -> list[tuple[FlaxPath, Transform]]:
    prefix, leaf = path[:-1], path[-1]
    if leaf == "weight":
        if ndim == 1:
            return [(prefix + ("scale",), IDENTITY)]  # GroupNorm / LayerNorm
        if ndim == 2:
            return [(prefix + ("kernel",), LINEAR), (prefix + ("embedding",), IDENTITY)]  # Linear / Embedding
        if ndim == 4:
            return [(prefix + ("kernel",), CONV2D), (prefix + ("kernel",), CONV1X1_AS_LINEAR)]
        if ndim == 5:
            return [(prefix + ("kernel",), CONV3D)]
        return []
    if leaf == "bias":
        return [(prefix + ("bias",), IDENTITY)]
    return [(path, IDENTITY)]  # plain parameters: mix_factor, class_embedding


def _legacy_alias(path: FlaxPath) -> FlaxPath | None:
    if len(path) >= 2 and path[-2] in LEGACY_ATTENTION_NAMES:
        return path[:-2] + (LEGACY_ATTENTION_NAMES[path[-2]], path[-1])
    return None


@dataclasses.dataclass
class ConversionPlan:
    """checkpoint name -> (Flax path, layout transform), covering both trees exactly."""

    entries: dict[str, tuple[FlaxPath, Transform]]
    ignored: list[str]


def _fmt(path: FlaxPath) -> str:
    return "/".join(path)


def _inverse_shape(t: Transform, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    # Expected PyTorch shape for an error message.
    if t is LINEAR:
        return tuple(reversed(flax_shape))
    if t is CONV2D and len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if t is CONV3D and len(flax_shape) == 5:
        d, h, w, i, o = flax_shape
        return (o, i, d, h, w)
    return tuple(flax_shape)


def plan_conversion(
    target: Mapping[FlaxPath, tuple[int, ...]],
    checkpoint: Mapping[str, tuple[int, ...]],
    *,
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
) -> ConversionPlan:
    """Map every checkpoint tensor onto exactly one Flax parameter; every Flax parameter must be filled.

    Args:
      target: flat ``{flax_path: shape}`` of the module (e.g. from ``jax.eval_shape`` + :func:`flatten_shapes`).
      checkpoint: ``{pytorch_name: shape}`` of the checkpoint.
      ignore: regexes of checkpoint names that are known non-parameters (e.g. CLIP's ``position_ids`` buffer).
      what: a description of the checkpoint for error messages.

    Raises:
      CheckpointError naming every unexpected tensor, every missing parameter and every shape mismatch (with
      the expected and found PyTorch shapes).
    """
    target = {tuple(k): tuple(v) for k, v in target.items()}
    ignore_re = [re.compile(p) for p in ignore]
    entries: dict[str, tuple[FlaxPath, Transform]] = {}
    filled: dict[FlaxPath, str] = {}
    unexpected, mismatched, duplicated, ignored = [], [], [], []
    for name, shape in checkpoint.items():
        shape = tuple(int(d) for d in shape)
        if any(r.fullmatch(name) for r in ignore_re):
            ignored.append(name)
            continue
        path = torch_name_to_path(name)
        cands = _rule_candidates(path, len(shape))
        alias = _legacy_alias(path)
        if alias is not None and not any(c[0] in target for c in cands):
            cands = _rule_candidates(alias, len(shape))
        hits = [(p, t) for p, t in cands if p in target]
        if not hits:
            unexpected.append(f"{name} {list(shape)}")
            continue
        ok = [(p, t) for p, t in hits if t.shape_fn(shape) == target[p]]
        if not ok:
            p, t = hits[0]
            mismatched.append(
                f"{name}: expected shape {list(_inverse_shape(t, target[p]))}, found {list(shape)} (Flax {_fmt(p)})"
            )
            continue
        p, t = ok[0]
        if p in filled:
            duplicated.append(f"{name} and {filled[p]} both fill {_fmt(p)}")
            continue
        filled[p] = name
        entries[name] = (p, t)
    missing = [f"{_fmt(p)} {list(s)}" for p, s in target.items() if p not in filled]
    _raise_mismatches(what, mismatched, unexpected, missing, duplicated)
    return ConversionPlan(entries, ignored)


def _raise_mismatches(what: str, mismatched, unexpected, missing, duplicated=(), hint: str = "") -> None:
    # One message for every problem at once (both layouts), so a bad checkpoint is diagnosed in one run.
    problems = []
    for label, items in (
        ("shape mismatch", mismatched),
        ("unexpected tensor (not in the model)", unexpected),
        ("missing tensor (model parameter not in the checkpoint)", missing),
        ("duplicate", duplicated),
    ):
        if items:
            shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {label}:\n  {shown}")
    if problems:
        raise CheckpointError(f"{what} does not match the model:\n" + "\n".join(problems) + hint)


def flatten_shapes(tree: Any) -> dict[FlaxPath, tuple[int, ...]]:
    """Flat ``{path: shape}`` of a (possibly abstract) parameter tree."""
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def load_params(
    abstract_params: Any,
    tensors: Mapping[str, np.ndarray],
    dtype: Any = jnp.float32,
    *,
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
    to_device: bool = True,
    sharding_fn: Callable[[tuple[int, ...]], Any] | None = None,
) -> dict:
    """Fill a Flax parameter tree from PyTorch-named tensors, strictly, casting to ``dtype``.

    Args:
      abstract_params: the module's parameter tree, arrays or ``jax.ShapeDtypeStruct``s (``jax.eval_shape``).
      tensors: ``{pytorch_name: numpy array}`` (memory-mapped is fine: each tensor is read once).
      dtype: the parameter dtype to cast to.
      to_device: return ``jax.Array``s (default) or numpy arrays.
      sharding_fn: shape -> ``jax.sharding.Sharding``: place each parameter on a mesh as it loads, every device
        reading only its own slice of the (memory-mapped, lazily transposed) tensor; nothing is staged whole
        on one device.
    """
    plan = plan_conversion(
        flatten_shapes(abstract_params), {k: v.shape for k, v in tensors.items()}, ignore=ignore, what=what
    )
    np_dtype = np.dtype(jnp.dtype(dtype))
    flat = {}
    for name, (path, t) in plan.entries.items():
        view = t.fn(tensors[name])  # a transposed view of the memory map: no copy yet
        if sharding_fn is not None:
            flat[path] = jax.make_array_from_callback(
                view.shape, sharding_fn(view.shape), lambda idx, v=view: np.ascontiguousarray(v[idx], np_dtype))
            continue
        arr = np.ascontiguousarray(view).astype(np_dtype, copy=False)
        flat[path] = jnp.asarray(arr) if to_device else arr
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------------------
# The Flax layout (python -m convert): names are Flax paths, tensors already transposed, one dtype
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _code_digest() -> str | None:
    # The code that turns a config into a parameter tree: the models and this file (config parsing), and the
    # jax and flax versions.
    import flax

    h = hashlib.sha256(f"jax {jax.__version__} flax {flax.__version__}".encode())
    try:
        root = Path(__file__).resolve().parent
        for f in [Path(__file__).resolve(), *sorted((root / "models").glob("*.py"))]:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    except OSError:
        return None
    return h.hexdigest()


def model_key(class_name: str, config: Mapping[str, Any]) -> str | None:
    """A digest of everything that decides a model's parameter tree: its class, its config and the code that
    builds it (``svd_jax/models``, this file, the jax and flax versions). Equal keys give equal trees; None when
    the sources cannot be read.

    The converter records it in the manifest, with :func:`tensors_digest` of the file it wrote after checking it
    against the model. When both still match at load time, the file is the tree ``jax.eval_shape`` would give,
    so the load skips that trace (about 2 s for the full-size UNet on CPU, as long as reading its 3 GB); any
    difference falls back to it.
    """
    code = _code_digest()
    if code is None:
        return None
    return hashlib.sha256(json.dumps([class_name, config, code], sort_keys=True, default=str).encode()).hexdigest()


def tensors_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    """A digest of a file's tensor names and shapes (``{name: shape}``)."""
    items = sorted((k, [int(d) for d in v]) for k, v in shapes.items())
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
      key: the model's :func:`model_key`. When it equals the manifest's and the file's tensors still have the
        manifest's :func:`tensors_digest`, the converter's check against this same model stands and
        ``abstract_params`` is not needed; otherwise every tensor is checked against it.

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
               and manifest.get("tensors_digest") == tensors_digest({k: v.shape for k, v in infos.items()}))
    if not checked:
        tree = abstract_params() if callable(abstract_params) else abstract_params
        target = {"/".join(p): s for p, s in flatten_shapes(tree).items()}
        mismatched = [f"{k}: expected shape {list(target[k])}, found {list(v.shape)}"
                      for k, v in infos.items() if k in target and tuple(v.shape) != target[k]]
        unexpected = [f"{k} {list(v.shape)}" for k, v in infos.items() if k not in target]
        missing = [f"{k} {list(s)}" for k, s in target.items() if k not in infos]
        _raise_mismatches(what, mismatched, unexpected, missing,
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


# --------------------------------------------------------------------------------------------------------------
# from_pretrained for the Flax modules
# --------------------------------------------------------------------------------------------------------------


class PretrainedMixin:
    """``module, params = Cls.from_pretrained(path_or_repo, subfolder=None, dtype=jnp.float32)`` for a Linen module.

    A subclass provides ``_weights_names`` (file names, in order of preference), ``_ignore_keys`` (regexes of
    checkpoint names that are not parameters), ``from_config(config: dict, dtype)`` and ``init_params_abstract()``.
    """

    _weights_names: tuple[str, ...] = (DIFFUSERS_WEIGHTS,)
    _ignore_keys: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32):  # pragma: no cover - abstract
        raise NotImplementedError

    def init_params_abstract(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        subfolder: str | None = None,
        dtype: Any = jnp.float32,
        *,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        param_sharding: Callable[[tuple[int, ...]], Any] | None = None,
    ):
        """Build the module from ``config.json`` and fill its parameters from the safetensors weights.

        Reads both layouts: diffusers/transformers (PyTorch names and layouts, converted as they load) and the
        Flax layout written by ``python -m convert`` (recognised by its ``flax_manifest.json``; loaded as is).

        Args:
          path_or_repo: a local folder (``save_pretrained`` output, hub snapshot or converted folder) or a hub
            repo id.
          subfolder: component folder inside it (``unet``, ``vae``, ``image_encoder``).
          dtype: compute and parameter dtype; weights are cast to it as they load (fp16 -> bf16 etc.).
          variant: ``"fp16"`` to read ``*.fp16.safetensors``. A converted folder has one set of weights: None or
            the variant it was converted from are accepted, any other is an error.
          param_sharding: shape -> Sharding, to place each parameter on a device mesh as it loads.

        Returns:
          ``(module, params)`` where ``module.apply({"params": params}, ...)`` runs the network.
        """
        files = resolve_checkpoint(
            path_or_repo, subfolder, weights_names=cls._weights_names, variant=variant, revision=revision,
            cache_dir=cache_dir, local_files_only=local_files_only,
        )
        try:
            config = json.loads(files.config.read_text())
        except ValueError as e:
            raise CheckpointError(f"{files.config}: not valid JSON: {e}") from e
        module = cls.from_config(config, dtype=dtype)
        if files.manifest is not None:  # converted ahead of time: no renaming, no transposing
            manifest = read_flax_manifest(files.manifest, cls.__name__)
            converted_from = manifest.get("variant")
            if variant and variant != converted_from:
                raise CheckpointError(
                    f"{files.source} was converted from the {converted_from or 'default'!r} weights, not variant "
                    f"{variant!r}; pass variant=None" + (f" or {converted_from!r}" if converted_from else "")
                    + " to load it")
            params = load_flax_params(
                module.init_params_abstract, files.weights[0], manifest, dtype,
                what=f"{cls.__name__} weights in {files.source} (Flax layout)", sharding_fn=param_sharding,
                key=model_key(cls.__name__, config),
            )
            return module, params
        tensors = read_checkpoint(files.weights)
        params = load_params(
            module.init_params_abstract(), tensors, dtype, ignore=cls._ignore_keys,
            what=f"{cls.__name__} weights in {files.source}", sharding_fn=param_sharding,
        )
        return module, params


def config_fields(cls, config: Mapping[str, Any], renames: Mapping[str, str] | None = None) -> dict:
    """The entries of a config dict that are fields of the dataclass ``cls`` (others are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in config.items():
        k = (renames or {}).get(k, k)
        if k in names and k not in ("parent", "name", "dtype", "param_dtype"):
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def check_class_name(config: Mapping[str, Any], expected: str, source: str = "config") -> None:
    """A diffusers config names its class; loading the wrong component's folder gets a clear error."""
    found = config.get("_class_name")
    if found is not None and found != expected:
        raise CheckpointError(f"{source} is for {found}, not {expected} (wrong subfolder?)")


# --------------------------------------------------------------------------------------------------------------
# The other direction: Flax params -> PyTorch-named tensors (to write diffusers-layout checkpoints)
# --------------------------------------------------------------------------------------------------------------

# Names whose "_<digit>" suffix is part of the PyTorch attribute name, not a list index.
_LITERAL_SUFFIXED = re.compile(r"^(linear_\d+)$")


def path_to_torch_name(path: FlaxPath, ndim: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Inverse of the conversion rules: Flax path -> (PyTorch name, array transform Flax -> PyTorch layout)."""
    parts = []
    for p in path[:-1]:
        m = re.match(r"^(.*)_(\d+)$", p)
        parts.append(p if (m is None or _LITERAL_SUFFIXED.match(p)) else f"{m.group(1)}.{m.group(2)}")
    leaf = path[-1]
    if leaf == "kernel":
        fn = {2: lambda a: np.transpose(a), 4: lambda a: np.transpose(a, (3, 2, 0, 1)),
              5: lambda a: np.transpose(a, (4, 3, 0, 1, 2))}[ndim]
        return ".".join(parts + ["weight"]), fn
    if leaf in ("scale", "embedding"):
        return ".".join(parts + ["weight"]), lambda a: a
    return ".".join(parts + [leaf]), lambda a: a


def params_to_torch_state(params: Any) -> dict[str, np.ndarray]:
    """Flax params -> ``{pytorch_name: numpy array in PyTorch layout}`` (what ``save_pretrained`` would write)."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        name, fn = path_to_torch_name(path, np.ndim(v))
        out[name] = np.ascontiguousarray(fn(np.asarray(v)))
    return out
