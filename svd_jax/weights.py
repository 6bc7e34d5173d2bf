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

Flax paths mirror the PyTorch names: ``down_blocks.0.resnets.1.conv1.weight`` lives at
``down_blocks_0/resnets_1/conv1/kernel``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

__all__ = [
    "CheckpointError",
    "CheckpointFiles",
    "ConversionPlan",
    "PretrainedMixin",
    "flatten_shapes",
    "load_params",
    "plan_conversion",
    "read_safetensors",
    "resolve_checkpoint",
]

CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

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
      CheckpointFiles with the config path and the weight file paths.
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
            raise CheckpointError(f"{where}: no {CONFIG_NAME}; a diffusers/transformers component folder needs one")
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
        raise CheckpointError(
            f"{where}: no {what}safetensors weights; looked for {candidates}, found {present or 'none'}"
            + (". Pass variant=None to load the default weights" if variant and present else "")
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
# Reading safetensors (memory-mapped, validated)
# --------------------------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map a safetensors file: ``{name: read-only numpy view}``, nothing copied until used.

    The header is checked against the file (every tensor's byte range inside the data, its size equal to
    dtype x shape), so a truncated or corrupt file raises :class:`CheckpointError` naming the file.
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
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
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
        out[name] = raw[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return out


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
        raise CheckpointError(f"{what} does not match the model:\n" + "\n".join(problems))
    return ConversionPlan(entries, ignored)


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

        Args:
          path_or_repo: a local folder (``save_pretrained`` output or hub snapshot) or a hub repo id.
          subfolder: component folder inside it (``unet``, ``vae``, ``image_encoder``).
          dtype: compute and parameter dtype; weights are cast to it as they load (fp16 -> bf16 etc.).
          variant: ``"fp16"`` to read ``*.fp16.safetensors``.
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
