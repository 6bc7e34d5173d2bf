"""Loop and slice helpers written for XLA's memory planning, and every backend-specific workaround.

Each workaround is behind one named predicate here, applied only on the backend where it was measured to help;
the predicates take the :class:`~svd_jax.options.ModelOptions` whose ``platform`` (or jax's default backend)
names the backend the program is built for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..options import ModelOptions

# Up to this many output pixels per image, a stride-1 conv runs as one matmul over the im2col'd taps on XLA:CPU,
# whose convolution is slow there and pathological at the smallest sizes (3x3, 1280 channels, 8 images: at 2x4
# 1078 ms vs 12 ms as a matmul; at 4x8 69 vs 40 ms; from 8x16 on the conv is faster). The copy is 9x a tiny
# input. benchmarks/unet_vs_diffusers.py at latent 16x32 hits this at the two lowest UNet levels. Not measured
# on GPU/TPU, whose convolutions have no such cliff: there the convolution runs as written.
SMALL_CONV_PIXELS = 32


def small_conv_as_matmul(options: ModelOptions, strides, out_pixels: int) -> bool:
    """XLA:CPU only: run a stride-1 convolution with at most ``SMALL_CONV_PIXELS`` output pixels per image as
    one im2col matmul."""
    return options.backend() == "cpu" and all(s == 1 for s in strides) and out_pixels <= SMALL_CONV_PIXELS


def conv_kernel_barrier(options: ModelOptions, kernel_dtype) -> bool:
    """XLA:CPU only, kernels not in float32: tie each convolution kernel to its input.

    XLA:CPU convolves bf16/fp16 in float32; the float32 kernel copy depends on the weights alone, so XLA hoisted
    every copy out of the denoising loop (2x the UNet's weights in float32, alive for the whole run). Tied to the
    input (an optimization barrier), each copy is made when its layer runs. Backends with native bf16
    convolutions make no copy."""
    return options.backend() == "cpu" and jnp.dtype(kernel_dtype) != jnp.float32


def barrier_slice(x, start, size: int, axis: int):
    """``x[start:start + size]`` along ``axis`` (dynamic start), behind an optimization barrier: in a loop, XLA
    would otherwise hoist the slice's float32 conversion out of it, i.e. convert the whole input at once.
    The barrier ties x to the (loop-varying) start: a barrier around the slice alone does not stop the hoist."""
    x, start = jax.lax.optimization_barrier((x, start))
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def map_chunks(fn, x, axis: int, size: int):
    """``fn`` over consecutive slices of ``size`` along ``axis`` of x, one slice at a time: the results are
    written into one output buffer in a loop. ``size`` divides ``x.shape[axis]``; ``fn`` keeps the slice's
    length along ``axis`` (other axes may change). Same values as ``fn(x)`` for a slice-wise ``fn``.

    Written for XLA's memory planning: each slice is a :func:`barrier_slice`. When ``fn`` keeps the slice's
    shape and dtype, results overwrite x's slices in place (each read before it is written; XLA copies x first
    only if x is used later). Otherwise the output buffer is computed from x (an independent zeros would be
    allocated at the start of the program and live through it).
    """
    n = x.shape[axis] // size
    piece_shape = x.shape[:axis] + (size,) + x.shape[axis + 1:]
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(piece_shape, x.dtype))
    put = lambda acc, i, y: jax.lax.dynamic_update_slice_in_dim(acc, y, i * size, axis)
    if out.shape == piece_shape and out.dtype == x.dtype:
        body = lambda i, acc: put(acc, i, fn(barrier_slice(acc, i * size, size, axis)))
        return jax.lax.fori_loop(0, n, body, x)
    piece = lambda i: barrier_slice(x, i * size, size, axis)
    shape = out.shape[:axis] + (x.shape[axis],) + out.shape[axis + 1:]
    buf = jnp.zeros(shape, out.dtype) * x.reshape(-1)[0].astype(out.dtype)
    body = lambda i, acc: put(acc, i, fn(piece(i)))
    return jax.lax.fori_loop(0, n, body, buf)


def map_rows(fn, x, row_bytes: int, budget):
    """``fn`` (position-wise over the last axis) over x (..., C) in row slices, each at most ``budget`` bytes'
    worth of ``row_bytes`` rows; all of x at once when it fits (or ``budget`` is None)."""
    rows = int(np.prod(x.shape[:-1]))
    if budget is None or rows * row_bytes <= budget:
        return fn(x)
    n = -(-rows * row_bytes // budget)  # slices
    size = -(-rows // n)
    flat = x.reshape(rows, x.shape[-1])
    if n * size != rows:  # pad to whole slices (zero rows, dropped after)
        flat = jnp.pad(flat, ((0, n * size - rows), (0, 0)))
    y = map_chunks(fn, flat, 0, size)
    return y[:rows].reshape(x.shape[:-1] + y.shape[-1:])
