"""The converter command, installed with the package as a top-level module.

    python -m convert SRC DST [--variant fp16] [--dtype bfloat16|float16|float32]

converts a diffusers/transformers SVD checkpoint (hub repo id, pipeline folder or one component folder) to
svd-jax's Flax layout, which ``from_pretrained`` loads without renaming or transposing, slice by slice onto a
mesh. A thin wrapper: the implementation lives in :mod:`svd_jax.convert` (``svd-jax convert`` is the same).
"""

from svd_jax.convert import convert_checkpoint, convert_component, main

__all__ = ["convert_checkpoint", "convert_component", "main"]
