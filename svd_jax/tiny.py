"""A tiny random SVD checkpoint in the diffusers hub layout, made without torch (``svd-jax make-tiny DIR``).

For smoke runs of the whole pipeline and CLI offline in seconds, for notebooks and docs on CPU. The weights
are random (the videos are noise); the layout, configs and tensor names are the real ones, so diffusers can
load the folder too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .configs import CLIP_PROCESSOR_CONFIG, MODEL_INDEX, SVD_SCHEDULER_CONFIG, TINY_CLIP, TINY_UNET, TINY_VAE
from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from .weights import params_to_torch_state, path_to_torch_name, write_safetensors
from .weights.torch_layout import torch_shape


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _random_leaf(rng, path, shape, dtype=np.float64) -> np.ndarray:
    """One random parameter (Flax path and layout), drawn in ``dtype``: norm scales near (not at) 1, biases and
    mix factors off 0, kernels scaled by fan-in."""
    n = rng.standard_normal(shape, dtype=dtype)
    if path[-1] == "kernel":
        return n / np.sqrt(np.prod(shape[:-1]))
    if path[-1] == "scale":
        return 1.0 + 0.1 * n
    if path[-1] in ("bias", "embedding"):
        return 0.05 * n
    return n  # mix_factor, class_embedding


def _random_params(module, seed: int):
    """Random params with sensible scales (:func:`_random_leaf`), float32."""
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    flat = {path: _random_leaf(rng, path, leaf.shape).astype(np.float32)
            for path, leaf in traverse_util.flatten_dict(module.init_params_abstract()).items()}
    return traverse_util.unflatten_dict(flat)


def write_random_weights(path: str | os.PathLike, module, dtype=np.float32, seed: int = 0) -> int:
    """Write random weights for ``module`` to one safetensors file in the diffusers/transformers layout (PyTorch
    names and layouts), streamed one tensor at a time: a full-size UNet (1.5 B params) without holding it in
    memory or running Flax init. Returns the file size in bytes."""
    from flax import traverse_util

    leaves = traverse_util.flatten_dict(module.init_params_abstract())
    specs, fns = [], []
    for p, leaf in leaves.items():
        name, fn = path_to_torch_name(p, len(leaf.shape))
        specs.append((name, np.dtype(dtype), torch_shape(fn, leaf.shape)))
        fns.append(fn)
    rng = np.random.default_rng(seed)

    def arrays():
        for (p, leaf), fn in zip(leaves.items(), fns):
            yield np.ascontiguousarray(fn(_random_leaf(rng, p, leaf.shape, np.float32))).astype(dtype)

    return write_safetensors(path, specs, arrays(), metadata={"format": "pt"})


def make_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SVD pipeline (model_index.json, unet/, vae/, image_encoder/, scheduler/,
    feature_extractor/) to ``folder``; returns its path. Generation size: any multiple of 8 (e.g. 64 x 64).
    Like the hub repos, every model has fp32 weights and an ``fp16`` variant (``variant="fp16"`` loads it)."""
    from safetensors.numpy import save_file

    root = Path(folder)
    comps = (("unet", UNetSpatioTemporalConditionModel, TINY_UNET, "diffusion_pytorch_model.safetensors"),
             ("vae", AutoencoderKLTemporalDecoder, TINY_VAE, "diffusion_pytorch_model.safetensors"),
             ("image_encoder", CLIPVisionModelWithProjection, TINY_CLIP, "model.safetensors"))
    for i, (name, cls, cfg, fname) in enumerate(comps):
        module = cls.from_config(cfg)
        params = _random_params(module, seed + i)
        _write_json(root / name / "config.json", cfg)
        state = params_to_torch_state(params)
        save_file(state, str(root / name / fname), metadata={"format": "pt"})
        fp16 = {k: np.asarray(v, np.float16) for k, v in state.items()}
        fp16_name = fname.replace(".safetensors", ".fp16.safetensors")
        save_file(fp16, str(root / name / fp16_name), metadata={"format": "pt"})
    _write_json(root / "scheduler" / "scheduler_config.json", SVD_SCHEDULER_CONFIG)
    _write_json(root / "feature_extractor" / "preprocessor_config.json", CLIP_PROCESSOR_CONFIG)
    _write_json(root / "model_index.json", MODEL_INDEX)
    return root
