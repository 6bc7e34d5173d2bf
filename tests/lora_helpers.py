"""Random LoRA adapters for the tests (no torch: the sharded subprocess scripts import this too)."""

import numpy as np

from svd_jax.lora import DEFAULT_TARGETS, LoRA, linear_modules, target_modules


def random_lora(unet_params, targets=DEFAULT_TARGETS, rank=2, alpha=3.0, seed=0, std=0.06) -> LoRA:
    """An adapter on ``targets`` of the UNet with random A and B (both non-zero: peft's zero B would hide bugs)."""
    shapes = linear_modules(unet_params)
    rng = np.random.default_rng(seed)
    weights = {m: ((std * rng.standard_normal((rank, shapes[m][0]))).astype(np.float32),
                   (std * rng.standard_normal((shapes[m][1], rank))).astype(np.float32))
               for m in target_modules(unet_params, targets)}
    return LoRA(weights, dict.fromkeys(weights, alpha))
