"""The one attention entry point of svd-jax.

Every attention in the three networks (CLIP self-attention, VAE mid-block attention, UNet spatial and
temporal attention) calls :func:`dot_product_attention`. Backends other than the plain one (cuDNN flash,
Pallas, blockwise online softmax) hang off the ``implementation`` argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def dot_product_attention(q, k, v, *, scale: float | None = None, implementation: str = "xla"):
    """softmax(q kᵀ · scale) v per head, logits and softmax in float32.

    Args:
      q: (..., Sq, heads, head_dim), any leading batch dims.
      k: (..., Sk, heads, head_dim).
      v: (..., Sk, heads, head_dim_v).
      scale: defaults to head_dim ** -0.5 (PyTorch SDPA's default).
      implementation: one of ``IMPLEMENTATIONS``.

    Returns:
      (..., Sq, heads, head_dim_v) in q's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if q.ndim < 3 or not q.ndim == k.ndim == v.ndim:
        raise ValueError(f"q, k, v must be (..., S, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
