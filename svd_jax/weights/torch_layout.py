"""PyTorch (diffusers/transformers) names and layouts <-> the Flax parameter tree.

Flax paths mirror the PyTorch names: ``down_blocks.0.resnets.1.conv1.weight`` lives at
``down_blocks_0/resnets_1/conv1/kernel``. A few rules map every tensor (rename, OIHW->HWIO, OIDHW->DHWIO,
Linear transpose, norm weight->scale); each layout rule is a :class:`Transform` that carries its inverse, so the
reading direction (:func:`plan_conversion`, :func:`load_params`) and the writing direction
(:func:`path_to_torch_name`, :func:`params_to_torch_state`) are one set of rules. The plan needs only shapes, so
full-size coverage is checkable on abstract trees.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .errors import raise_mismatches

__all__ = [
    "CONV1X1_AS_LINEAR",
    "CONV2D",
    "CONV3D",
    "IDENTITY",
    "LEGACY_ATTENTION_NAMES",
    "LINEAR",
    "TRANSFORMS",
    "ConversionPlan",
    "FlaxPath",
    "Transform",
    "flatten_shapes",
    "load_params",
    "params_to_torch_state",
    "path_to_torch_name",
    "plan_conversion",
    "torch_name_to_path",
]

# Legacy names of diffusers' deprecated VAE attention blocks (ModelMixin._fix_state_dict_keys_on_load).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}

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



@dataclasses.dataclass(frozen=True)
class Transform:
    """One layout rule, both ways. ``fn`` turns a PyTorch-layout array into the Flax layout and ``inverse`` turns
    it back; ``shape_fn`` and ``inverse_shape`` do the same to shapes, with no data.

    ``shape_fn`` gives ``(-1,)`` for a PyTorch shape the rule does not apply to (it then fits no parameter);
    ``inverse_shape`` gives a Flax shape of another rank back as it is (it is used to word error messages).
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    shape_fn: Callable[[tuple[int, ...]], tuple[int, ...]]
    inverse: Callable[[np.ndarray], np.ndarray]
    inverse_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def _perm(name: str, axes: tuple[int, ...]) -> Transform:
    back = tuple(int(i) for i in np.argsort(axes))

    def permute(order):
        return lambda s: tuple(s[i] for i in order) if len(s) == len(order) else tuple(s)

    return Transform(name, lambda a: np.transpose(a, axes), permute(axes), lambda a: np.transpose(a, back),
                     permute(back))


IDENTITY = Transform("as is", lambda a: a, lambda s: tuple(s), lambda a: a, lambda s: tuple(s))
LINEAR = _perm("Linear (out,in)->(in,out)", (1, 0))
CONV2D = _perm("Conv2d OIHW->HWIO", (2, 3, 1, 0))
CONV3D = _perm("Conv3d OIDHW->DHWIO", (2, 3, 4, 1, 0))
CONV1X1_AS_LINEAR = Transform(
    "1x1 Conv2d (O,I,1,1)->(I,O)",
    lambda a: np.transpose(a[:, :, 0, 0]),
    lambda s: (s[1], s[0]) if s[2:] == (1, 1) else (-1,),
    lambda a: np.transpose(a)[:, :, None, None],
    lambda s: (s[1], s[0], 1, 1) if len(s) == 2 else tuple(s),
)
TRANSFORMS = (IDENTITY, LINEAR, CONV2D, CONV3D, CONV1X1_AS_LINEAR)  # every rule _rule_candidates uses

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
                f"{name}: expected shape {list(t.inverse_shape(target[p]))}, found {list(shape)} (Flax {_fmt(p)})"
            )
            continue
        p, t = ok[0]
        if p in filled:
            duplicated.append(f"{name} and {filled[p]} both fill {_fmt(p)}")
            continue
        filled[p] = name
        entries[name] = (p, t)
    missing = [f"{_fmt(p)} {list(s)}" for p, s in target.items() if p not in filled]
    raise_mismatches(what, mismatched, unexpected, missing, duplicated)
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
# The other direction: Flax params -> PyTorch-named tensors (to write diffusers-layout checkpoints)
# --------------------------------------------------------------------------------------------------------------

# Names whose "_<digit>" suffix is part of the PyTorch attribute name, not a list index.
_LITERAL_SUFFIXED = re.compile(r"^(linear_\d+)$")
# The PyTorch leaf of each Flax leaf that is renamed (any other keeps its name).
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _torch_rule(path: FlaxPath, ndim: int) -> tuple[FlaxPath, Transform]:
    # The rule plan_conversion applies to a PyTorch tensor of this rank that lands on ``path`` (the first such
    # candidate, as plan_conversion tries them): a Flax kernel is written as a Linear / Conv2d / Conv3d weight.
    torch_path = path[:-1] + (_TORCH_LEAF.get(path[-1], path[-1]),)
    for p, t in _rule_candidates(torch_path, ndim):
        if p == path:
            return torch_path, t
    raise ValueError(f"{_fmt(path)} ({ndim}-d): no conversion rule gives this Flax parameter, so it has no "
                     "PyTorch name that would load back onto it")


def path_to_torch_name(path: FlaxPath, ndim: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Inverse of the conversion rules: Flax path -> (PyTorch name, array transform Flax -> PyTorch layout).

    The transform is the inverse of the rule :func:`plan_conversion` applies to that name and rank, so the
    tensor written loads back onto ``path`` unchanged.
    """
    torch_path, t = _torch_rule(tuple(path), ndim)
    parts = []
    for p in torch_path[:-1]:
        m = re.match(r"^(.*)_(\d+)$", p)
        parts.append(p if (m is None or _LITERAL_SUFFIXED.match(p)) else f"{m.group(1)}.{m.group(2)}")
    return ".".join(parts + [torch_path[-1]]), t.inverse


def torch_shape(fn: Callable[[np.ndarray], np.ndarray], shape) -> tuple[int, ...]:
    """The PyTorch-layout shape of a Flax parameter of ``shape`` (``fn``: its Flax -> PyTorch transform, from
    :func:`path_to_torch_name`); nothing is allocated."""
    return tuple(fn(np.broadcast_to(np.zeros((), np.uint8), tuple(shape))).shape)


def params_to_torch_state(params: Any) -> dict[str, np.ndarray]:
    """Flax params -> ``{pytorch_name: numpy array in PyTorch layout}`` (what ``save_pretrained`` would write)."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        name, fn = path_to_torch_name(path, np.ndim(v))
        out[name] = np.ascontiguousarray(fn(np.asarray(v)))
    return out
