"""``from_pretrained`` for the Flax modules (both layouts), and the config helpers the models build from."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from .errors import CheckpointError
from .flax_layout import load_flax_params, model_key, read_flax_manifest
from .locate import DIFFUSERS_WEIGHTS, resolve_checkpoint
from .safetensors_io import read_checkpoint
from .torch_layout import load_params

__all__ = ["PretrainedMixin", "check_class_name", "config_fields"]


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

    # Stability's single files (svd_jax/weights/sgm.py): a subclass names its tensors' prefixes, its renaming
    # (diffusers name, module) -> single-file name, and the svd_jax.configs entry it defaults to
    _sgm_prefixes: tuple[str, ...] = ()
    _sgm_rename: Callable | None = None
    _single_file_config: str | None = None

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None = None,
                         dtype: Any = jnp.float32, *, param_sharding: Callable | None = None):
        """Load this network from one of Stability's original single-file SVD checkpoints (``svd.safetensors``,
        ``svd_xt.safetensors``, ``svd_xt_1_1.safetensors``; memory-mapped, each tensor read once).

        Args:
          path: the ``.safetensors`` file.
          config: a diffusers-style config dict, or a path to its ``config.json``; default: SVD-XT's.
          dtype: compute and parameter dtype (the file's fp16/fp32 tensors are cast as they load).
          param_sharding: shape -> Sharding, to place each parameter on a mesh as it loads.

        Returns:
          ``(module, params)``, as :meth:`from_pretrained`. A tensor the config needs that is missing or has
          another shape, or one under this network's prefix that nothing reads, raises ``CheckpointError``
          naming it (svd_jax/weights/sgm.py lists the tensors ignored by name).
        """
        from .safetensors_io import read_safetensors
        from .sgm import sgm_tensors
        from .torch_layout import flatten_shapes, path_to_torch_name, torch_shape

        if config is None:
            from .. import configs

            config = dict(getattr(configs, cls._single_file_config))
        elif not isinstance(config, Mapping):
            try:
                with open(os.fspath(config)) as fh:
                    config = json.load(fh)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"config {config}: not a readable JSON config ({e})") from e
        p = os.fspath(path)
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: no such file (from_single_file takes one .safetensors file)")
        module = cls.from_config(config, dtype=dtype)
        abstract = module.init_params_abstract()
        needed = {}
        for fpath, shape in flatten_shapes(abstract).items():
            name, fn = path_to_torch_name(fpath, len(shape))
            needed[name] = torch_shape(fn, shape)
        where = f"{cls.__name__} from the single file {p}"
        tensors = sgm_tensors(needed, read_safetensors(p), lambda n: cls._sgm_rename(n, module), cls._sgm_prefixes,
                              where)
        params = load_params(abstract, tensors, dtype, what=where, sharding_fn=param_sharding)
        return module, params


def config_fields(cls, config: Mapping[str, Any]) -> dict:
    """The entries of a config dict that are fields of the dataclass ``cls`` (others are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in config.items():
        if k in names and k not in ("parent", "name", "dtype", "param_dtype", "options"):
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def check_class_name(config: Mapping[str, Any], expected: str, source: str = "config") -> None:
    """A diffusers config names its class; loading the wrong component's folder gets a clear error."""
    found = config.get("_class_name")
    if found is not None and found != expected:
        raise CheckpointError(f"{source} is for {found}, not {expected} (wrong subfolder?)")
