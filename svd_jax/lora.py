"""LoRA adapters for the UNet, exchangeable with peft and diffusers.

An adapter adds ``(alpha / r) * scale * B @ A`` to the weight ``W`` (out, in) of a linear layer (peft's
convention; ``alpha / sqrt(r)`` with ``use_rslora``). svd-jax keeps the UNet's parameter layout unchanged: an
adapter is a separate :class:`LoRA` object, fused into a copy of the params by :func:`apply_lora`.

Formats read by :func:`load_lora` (strictly: every tensor must belong to a known module with matching shapes,
or nothing is returned):

* a peft folder: ``adapter_config.json`` + ``adapter_model.safetensors``, keys ``<module>.lora_A.weight`` /
  ``.lora_B.weight`` with or without the ``base_model.model.`` prefix; rank and alpha per module from ``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``;
* a diffusers-style single file (``pytorch_lora_weights.safetensors``): keys prefixed ``unet.``, names
  ``lora_A``/``lora_B`` or ``lora.down``/``lora.up``, an optional per-module ``.alpha`` (absent: alpha = rank).

:func:`save_lora` writes a peft folder (what ``PeftModel.save_pretrained`` writes) that peft loads onto
diffusers' ``UNetSpatioTemporalConditionModel``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_PREFIX = "base_model.model."
# peft's usual SVD targets: the projections of every spatial and temporal attention
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRAError(ValueError):
    """An adapter that cannot be read or applied; the message names the file, key or module."""


@dataclasses.dataclass
class LoRA:
    """One adapter: ``weights[module] = (A (r, in), B (out, r))`` float32 numpy arrays, keyed by the diffusers
    module name (``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"``); ``alphas[module]`` its
    ``lora_alpha``; ``use_rslora``: scaling alpha / sqrt(r) instead of alpha / r."""

    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    alphas: dict[str, float]
    use_rslora: bool = False

    def rank(self, module: str) -> int:
        """r of ``module``'s adapter."""
        return int(self.weights[module][0].shape[0])

    def scaling(self, module: str) -> float:
        """alpha / r (``use_rslora``: alpha / sqrt(r)) of ``module``."""
        r = self.rank(module)
        return self.alphas[module] / (math.sqrt(r) if self.use_rslora else r)

    def delta(self, module: str) -> np.ndarray:
        """The weight change at scale 1 in PyTorch layout, (out, in) float32."""
        a, b = self.weights[module]
        return self.scaling(module) * (b.astype(np.float32) @ a.astype(np.float32))


def _pattern_value(name: str, pattern: Mapping[str, float], default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoRAError(f"{path}: not a readable safetensors file ({e})") from None


def _split_key(key: str) -> tuple[str, str]:
    """A LoRA tensor name -> (module, part) with part in 'A', 'B', 'alpha'; ValueError if it is none."""
    for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora.down.weight", "A"),
                         (".lora.up.weight", "B"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    raise ValueError(key)


def _collect(tensors: Mapping[str, np.ndarray], prefix: str, source: str) -> tuple[dict, dict]:
    """{module: (A, B)}, {module: alpha tensor value} from LoRA tensors whose names start with ``prefix``."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        try:
            module, part = _split_key(name)
        except ValueError:
            raise LoRAError(f"{source}: tensor {key!r} is not a LoRA tensor (expected <module>.lora_A.weight, "
                            f".lora_B.weight, .lora.down.weight, .lora.up.weight or .alpha)") from None
        parts.setdefault(module, {})[part] = value
    if not parts:
        raise LoRAError(f"{source}: holds no LoRA tensors")
    weights, alphas = {}, {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise LoRAError(f"{source}: module {module!r} has {sorted(p)} but needs both lora_A and lora_B")
        a, b = np.asarray(p["A"], np.float32), np.asarray(p["B"], np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(f"{source}: module {module!r}: lora_A {a.shape} and lora_B {b.shape} are not "
                            f"(r, in) and (out, r) of one rank (convolution adapters are not supported)")
        weights[module] = (a, b)
        if "alpha" in p:
            alphas[module] = float(np.asarray(p["alpha"]).reshape(()))
    return weights, alphas


def _resolve(path, weight_name, subfolder) -> Path:
    """The adapter's weights file: ``path`` itself when it is a file, else looked up in a local folder or a hub
    repo through the models' file lookup (:class:`svd_jax.weights.locate.Source`), a peft config beside it
    fetched too where there is one."""
    from .weights.errors import CheckpointError
    from .weights.locate import Source

    p = Path(path).expanduser()
    if p.is_file():
        return p
    try:
        src = Source(path)
    except CheckpointError as e:
        raise LoRAError(f"LoRA path {path} does not exist ({e})") from None
    prefix = f"{subfolder}/" if subfolder else ""
    names = [weight_name] if weight_name else [PEFT_WEIGHTS, DIFFUSERS_WEIGHTS]
    for name in names:
        file = src.file(prefix + name)
        if file is not None:
            src.file(prefix + PEFT_CONFIG)  # a hub repo's config lands beside the weights in the cache
            return file
    raise LoRAError(f"{src.describe()}/{prefix}: holds none of {names}"
                    f"{'' if weight_name else f' (a peft folder is {PEFT_WEIGHTS} + {PEFT_CONFIG})'}")


def load_lora(path, weight_name: str | None = None, subfolder: str | None = None) -> LoRA:
    """An adapter from a peft folder, a peft/diffusers safetensors file, or a hub repo id.

    Args:
      path: a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``), a folder holding
        ``pytorch_lora_weights.safetensors``, a ``.safetensors`` file, or a hub repo id.
      weight_name: the file name inside the folder or repo.
      subfolder: a folder inside ``path``.

    Returns:
      a :class:`LoRA` (A (r, in), B (out, r) per module).
    """
    p = _resolve(path, weight_name, subfolder)
    tensors = _read_safetensors(p)
    config_file = p.parent / PEFT_CONFIG
    if any(k.startswith("unet.") for k in tensors):  # diffusers naming
        other = [k for k in tensors if not k.startswith("unet.")]
        if other:
            raise LoRAError(f"{p}: tensors outside the UNet ({other[0]!r}, ...): only UNet adapters apply to SVD")
        weights, alphas = _collect(tensors, "unet.", str(p))
        return LoRA(weights, {m: alphas.get(m, float(a.shape[0])) for m, (a, _) in weights.items()})
    weights, _ = _collect(tensors, PEFT_PREFIX, str(p))
    if not config_file.exists():
        raise LoRAError(f"{p}: peft-style tensors need {config_file.name} beside them (the adapter's r and "
                        f"lora_alpha); for diffusers naming prefix the keys with 'unet.'")
    cfg = json.loads(config_file.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{config_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    alphas = {}
    for m, (a, _) in weights.items():
        r = _pattern_value(m, rank_pattern, r0)
        if a.shape[0] != r:
            raise LoRAError(f"{p}: module {m!r} has rank {a.shape[0]} but {config_file.name} says r={r}")
        alphas[m] = float(_pattern_value(m, alpha_pattern, alpha0))
    return LoRA(weights, alphas, bool(cfg.get("use_rslora", False)))


def _kernel_keys(flat_params: Mapping[tuple, object]) -> dict[str, tuple]:
    """diffusers module name -> Flax path of its linear kernel (2-D), for every linear layer of the params."""
    from .weights.torch_layout import path_to_torch_name

    out = {}
    for path, v in flat_params.items():
        if path[-1] == "kernel" and np.ndim(v) == 2:
            name = path_to_torch_name(path, 2)[0]
            out[name[: -len(".weight")]] = path
    return out


def linear_modules(unet_params) -> dict[str, tuple[int, int]]:
    """{diffusers module name: (in, out)} of every linear layer of the UNet params (nested, or a
    ``{"params": ...}`` wrapper; concrete or ``jax.ShapeDtypeStruct`` leaves)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(_unwrap(unet_params)[0])
    return {m: tuple(np.shape(flat[p])) for m, p in _kernel_keys(flat).items()}


def target_modules(unet_params, targets=DEFAULT_TARGETS) -> list[str]:
    """The linear layers an adapter with peft's ``target_modules=targets`` covers: a module named ``t`` or
    ending in ``.t`` for some ``t`` in ``targets`` (``"to_q"``, ``"to_out.0"``, ``"ff.net.2"``, ``"proj_in"``,
    ``"time_embedding.linear_1"``, ...). An empty selection or a target matching nothing is an error."""
    modules = linear_modules(unet_params)
    if isinstance(targets, str) or not targets:
        raise LoRAError(f"LoRA targets must be a non-empty list of module names, e.g. {list(DEFAULT_TARGETS)}; "
                        f"got {targets!r}")
    hits = {t: [m for m in modules if m == t or m.endswith("." + t)] for t in targets}
    unmatched = [t for t, ms in hits.items() if not ms]
    if unmatched:
        ends = sorted({m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] if m.split(".")[-1].isdigit()
                       else m.rsplit(".", 1)[-1] for m in modules})
        raise LoRAError(f"LoRA targets {unmatched} match no linear layer of this UNet (its layer names end in "
                        f"{', '.join(ends[:24])}{', ...' if len(ends) > 24 else ''})")
    return sorted({m for ms in hits.values() for m in ms})


def _unwrap(unet_params):
    """(the nested params, whether they came wrapped in ``{"params": ...}``)."""
    wrapped = isinstance(unet_params, Mapping) and set(unet_params) == {"params"}
    return (unet_params["params"] if wrapped else unet_params), wrapped


def check_fits(unet_params, lora: LoRA) -> None:
    """LoRAError unless every module of ``lora`` is a linear layer of the UNet with the adapter's shapes."""
    modules = linear_modules(unet_params)
    for m, (a, b) in lora.weights.items():
        if m not in modules:
            near = sorted(k for k in modules if k.rsplit(".", 1)[-1] == m.rsplit(".", 1)[-1])[:3]
            raise LoRAError(f"adapter module {m!r} is not a linear layer of this UNet"
                            f"{' (e.g. ' + ', '.join(near) + ')' if near else ''}: an adapter for another "
                            f"model?")
        kin, kout = modules[m]
        if a.shape[1] != kin or b.shape[0] != kout:
            raise LoRAError(f"adapter module {m!r}: lora_A {a.shape} / lora_B {b.shape} do not fit the layer's "
                            f"weight ({kout}, {kin})")


def factors(lora: LoRA, scale=1.0) -> dict:
    """The adapter as arrays for a compiled program: ``{"A": {module: (r, in)}, "B": {module: (out, r)},
    "scale": {module: () float32}}`` with scale = ``scale`` * alpha / r (a traced ``scale`` stays traced).
    Values, not shapes, carry the weight: a new ``scale`` does not retrace a program taking them."""
    import jax.numpy as jnp

    return {"A": {m: jnp.asarray(a, jnp.float32) for m, (a, _) in lora.weights.items()},
            "B": {m: jnp.asarray(b, jnp.float32) for m, (_, b) in lora.weights.items()},
            "scale": {m: jnp.asarray(scale, jnp.float32) * lora.scaling(m) for m in lora.weights}}


def fuse(unet_params, adapters) -> dict:
    """``unet_params`` with each adapter of ``adapters`` (a list of :func:`factors` dicts) added to its layers'
    kernels: ``kernel + scale * (B @ A)ᵀ``, summed over adapters, in float32 (HIGHEST matmul precision, so a TPU
    does not round the product to bfloat16), cast back to the kernel's dtype. Traceable: under ``jit`` this is
    the unfused adapter applied inside the program (and differentiable in the factors, which LoRA training
    uses). Modules are not checked here (:func:`check_fits`)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    tree, wrapped = _unwrap(unet_params)
    flat = traverse_util.flatten_dict(tree)
    keys = _kernel_keys(flat)
    deltas: dict[tuple, object] = {}
    for ad in adapters:
        for m, a in ad["A"].items():
            d = ad["scale"][m] * jnp.matmul(jnp.asarray(a, jnp.float32).T, jnp.asarray(ad["B"][m], jnp.float32).T,
                                            precision=jax.lax.Precision.HIGHEST)
            deltas[keys[m]] = d if keys[m] not in deltas else deltas[keys[m]] + d
    for path, d in deltas.items():
        k = flat[path]
        flat[path] = (jnp.asarray(k, jnp.float32) + d).astype(k.dtype)
    out = traverse_util.unflatten_dict(flat)
    return {"params": out} if wrapped else out


def apply_lora(unet_params, lora: LoRA | list, scale=1.0):
    """UNet params with the adapter(s) fused: ``kernel + scale * (alpha/r) * (B @ A)ᵀ`` for each adapted layer.

    Args:
      unet_params: the UNet's Flax params (a nested dict, as from ``from_pretrained``; a ``{"params": ...}``
        wrapper is accepted).
      lora: a :class:`LoRA`, or a list of them (summed).
      scale: a float, or one per adapter; may be a traced scalar (no retrace when it changes under jit).

    Returns:
      the same tree as ``unet_params``; every leaf not adapted is the input leaf itself, every adapted one has
      its kernel's dtype and, for a ``jax.Array`` on a mesh, its sharding (an adapter shards like its base
      weight).

    Raises LoRAError before changing anything if a module is not a linear layer of this UNet or a shape differs.
    """
    import jax

    loras = list(lora) if isinstance(lora, (list, tuple)) else [lora]
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(loras)
    if len(scales) != len(loras):
        raise LoRAError(f"{len(scales)} scales for {len(loras)} adapters")
    for ad in loras:
        check_fits(unet_params, ad)
    out = fuse(unet_params, [factors(ad, s) for ad, s in zip(loras, scales)])
    # eager on a mesh: keep each fused kernel where its base kernel was (XLA may pick another layout)
    return jax.tree.map(lambda new, old: jax.device_put(new, old.sharding)
                        if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer)
                        and new is not old and len(old.sharding.device_set) > 1 else new, out, unet_params)


def save_lora(lora: LoRA, directory, base_model_name_or_path: str | None = None, format: str = "peft") -> Path:
    """Write ``lora`` into ``directory`` (created if absent); returns the folder.

    ``format="peft"`` (the default): ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, as ``PeftModel.save_pretrained``); ranks
    and alphas that differ between modules go to ``rank_pattern`` / ``alpha_pattern`` under the full module
    names. ``format="diffusers"``: one ``pytorch_lora_weights.safetensors`` with keys
    ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``unet.<module>.alpha`` (diffusers' single-file
    naming; ``use_rslora`` cannot be expressed there and is refused). Each file is written atomically.
    """
    from safetensors.numpy import save_file

    from .training.export import _atomic_file, _write_json_atomic  # temporary sibling, os.replace, cleanup

    if format not in ("peft", "diffusers"):
        raise LoRAError(f"save_lora: format must be 'peft' or 'diffusers', not {format!r}")
    if not lora.weights:
        raise LoRAError("save_lora: the adapter has no modules")
    if format == "diffusers" and lora.use_rslora:
        raise LoRAError("save_lora: the diffusers naming has no use_rslora; save this adapter as format='peft'")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    modules = sorted(lora.weights)
    if format == "diffusers":
        tensors = {}
        for m in modules:
            a, b = lora.weights[m]
            tensors[f"unet.{m}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
            tensors[f"unet.{m}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
            tensors[f"unet.{m}.alpha"] = np.asarray(lora.alphas[m], np.float32)
        _atomic_file(d / DIFFUSERS_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        return d
    ranks = {m: lora.rank(m) for m in modules}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(lora.alphas.values()), key=list(lora.alphas.values()).count)
    config = dict(peft_type="LORA", task_type=None, r=r0, lora_alpha=a0, target_modules=modules,
                  rank_pattern={m: r for m, r in ranks.items() if r != r0},
                  alpha_pattern={m: a for m, a in lora.alphas.items() if a != a0},
                  use_rslora=lora.use_rslora, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  init_lora_weights=True, base_model_name_or_path=base_model_name_or_path)
    tensors = {}
    for m in modules:
        a, b = lora.weights[m]
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    _atomic_file(d / PEFT_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_json_atomic(d / PEFT_CONFIG, config)
    return d
