"""Building blocks shared by the VAE and the UNet (and the CLIP tower's norms).

Layout is channels-last: images (N, H, W, C), videos folded as (B*F, H, W, C) b-major or (B, F, H, W, C).
Norms, softmax and sigmoid run in float32 whatever the compute dtype; parameters are created in
``param_dtype`` and cast to ``dtype`` for the matmuls and convolutions.
Submodule names mirror the diffusers attribute names so that the weight converter needs no tables.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..options import DEFAULT_OPTIONS, ModelOptions
from .attention import dot_product_attention
from .xla_ops import conv_kernel_barrier, map_chunks, map_rows, small_conv_as_matmul

Dtype = Any


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over channels-last input, statistics in float32 (two-pass variance).

    Statistics are taken per sample (axis 0) and group over ALL other axes, so (N, H, W, C) normalises each
    image, and (B, F, H, W, C) pools over the frames of a video, as PyTorch's 5-D GroupNorm does.
    ``stats``: (mean, var), each (N, num_groups) float32, to normalise with statistics taken elsewhere (over
    tiles of a larger tensor: :meth:`partial_sums`); default: x's own. ``remat``: under differentiation keep
    only x (not the float32 statistics and centred copy) and recompute the norm in the backward pass.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, stats=None):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale = param(self, "scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (c,), self.param_dtype)
        if stats is not None:
            lead = (x.shape[0],) + (1,) * (x.ndim - 2)
            mean, var = (s.reshape(lead + (self.num_groups, 1)) for s in stats)
            return group_normalize(x, mean, var, scale, bias, self.epsilon, self.dtype)
        def norm(x, scale, bias):
            # Only the channel axis is split into groups: merging the spatial axes would merge a device-split
            # axis into another one, which XLA's partitioner can only do by gathering.
            xg = self._grouped(x)
            axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
            mean = xg.mean(axis=axes, keepdims=True)
            var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
            return group_normalize(x, mean, var, scale, bias, self.epsilon, self.dtype)

        return recomputed(norm, self.remat)(x, scale, bias)

    def _grouped(self, x):
        return x.astype(jnp.float32).reshape(x.shape[:-1] + (self.num_groups, x.shape[-1] // self.num_groups))

    def partial_sums(self, x, mean=None):
        """Float32 sums per (sample, group), (N, num_groups), of x (N, ..., C), or with ``mean`` (N, num_groups)
        of (x - mean)^2: summed over the tiles of a tensor and divided by :meth:`count`, they are the statistics
        of the whole tensor (two passes, as ``__call__``)."""
        xg = self._grouped(x)
        if mean is not None:
            xg = jnp.square(xg - jnp.repeat(mean, xg.shape[-1], axis=-1).reshape(
                (x.shape[0],) + (1,) * (x.ndim - 2) + xg.shape[-2:]))
        return xg.sum(axis=tuple(range(1, x.ndim - 1)) + (x.ndim,))

    def count(self, shape) -> int:
        """How many elements of a tensor of ``shape`` (N, ..., C) one (sample, group) statistic pools."""
        return int(np.prod(shape[1:-1])) * (shape[-1] // self.num_groups)


def group_normalize(x, mean, var, scale, bias, eps: float, dtype):
    """GroupNorm's affine normalisation of x (N, ..., C) given float32 group statistics ``mean``, ``var`` of shape
    broadcastable to (N, ..., G, C/G); the result in ``dtype``."""
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (mean.shape[-2], x.shape[-1] // mean.shape[-2]))
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, in float32 (two-pass variance), explicit epsilon. ``remat``: as
    :class:`GroupNorm`'s."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (c,), self.param_dtype)

        def norm(x, scale, bias):
            xf = x.astype(jnp.float32)
            mean = xf.mean(-1, keepdims=True)
            var = jnp.square(xf - mean).mean(-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
            return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)

        return recomputed(norm, self.remat)(x, scale, bias)


def recomputed(fn, remat: bool):
    """``fn``, or with ``remat`` ``jax.checkpoint(fn)``: under differentiation only its arguments are kept and its
    insides recomputed in the backward pass (remat granularity "layers", svd_jax/options.py); the same values."""
    return jax.checkpoint(fn) if remat else fn


def param(module: nn.Module, name: str, init_fn, shape: tuple, dtype: Dtype):
    """``module.param(name, init_fn, shape, dtype)``, minus a cost: on every apply, Flax traces ``init_fn`` to
    check the given parameter's shape (``jax.eval_shape``, ~1 ms per parameter: 2.7 s of tracing SVD-XT's
    generation). A given parameter is checked against ``shape`` here instead, with Flax's error."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if tuple(np.shape(value)) != tuple(shape):
            raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, np.shape(value), tuple(shape))
        return value
    return module.param(name, init_fn, shape, dtype)


class Dense(nn.Module):
    """torch.nn.Linear as ``flax.linen.Dense`` (params ``kernel`` (in, out), ``bias``; same maths), created with
    :func:`param`. x (..., in) -> (..., features)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = param(self, "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                       self.param_dtype).astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True) -> Dense:
    """torch.nn.Linear: kernel (in, out)."""
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class Conv(nn.Module):
    """torch.nn.Conv2d/Conv3d on channels-last input, params ``kernel`` (*k, in, out) and ``bias`` like nn.Conv.

    x (N, *spatial, in) -> (N, *spatial', features). ``padding``: sequence of (lo, hi) per spatial dim.
    ``options.conv_kernel_hook`` is applied to the kernel before use: a partitioner pins kernels replicated there,
    which keeps XLA's Shardy partitioner from splitting a kernel's spatial taps along with a device-split image
    axis (it computed wrong convolutions when the split was uneven: jax 0.10, CPU, a 3-tap kernel on 8 devices).
    """

    features: int
    kernel_size: tuple
    strides: tuple | None = None
    padding: Any = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x):
        k = tuple(self.kernel_size)
        nd = len(k)
        strides = tuple(self.strides or (1,) * nd)
        pad = self.padding if self.padding is not None else tuple((kk // 2, kk // 2) for kk in k)
        kernel = param(self, "kernel", nn.initializers.lecun_normal(), k + (x.shape[-1], self.features),
                       self.param_dtype).astype(self.dtype)
        if self.options.conv_kernel_hook is not None:
            kernel = self.options.conv_kernel_hook(kernel)
        x = x.astype(self.dtype)
        if conv_kernel_barrier(self.options, kernel.dtype):
            kernel, x = jax.lax.optimization_barrier((kernel, x))
        spatial_out = [(n + lo + hi - kk) // s + 1 for n, (lo, hi), kk, s in zip(x.shape[1:-1], pad, k, strides)]
        if small_conv_as_matmul(self.options, strides, int(np.prod(spatial_out))):
            xp = jnp.pad(x, ((0, 0),) + tuple(pad) + ((0, 0),))
            cols = jnp.concatenate([xp[(slice(None),) + tuple(slice(t, t + n) for t, n in zip(tap, spatial_out))]
                                    for tap in np.ndindex(*k)], axis=-1)  # taps in kernel order, then channels
            y = jnp.einsum("...c,cd->...d", cols, kernel.reshape(-1, kernel.shape[-1]))
        else:
            dims = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[nd]
            y = jax.lax.conv_general_dilated(x, kernel, strides, pad, dimension_numbers=dims)
        if self.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


def conv(features: int, kernel, name: str | None, dtype: Dtype, param_dtype: Dtype, options: ModelOptions, *,
         strides=None, padding=None, use_bias: bool = True) -> Conv:
    """torch.nn.Conv2d/3d with explicit padding (default: 'same' for odd kernels, symmetric)."""
    return Conv(features, tuple(kernel), strides, padding, use_bias, dtype, param_dtype, options, name=name)


class Attention(nn.Module):
    """diffusers ``Attention`` (AttnProcessor2_0 maths) on token sequences.

    Params: ``to_q``, ``to_k``, ``to_v`` (bias if ``bias``), ``to_out_0`` (always biased), optional
    ``group_norm`` applied to the query input before projection, optional residual (added after to_out).

    Call: x (..., S, query_dim), context (..., Sk, cross_dim) or None for self-attention -> (..., S, query_dim);
    any leading batch dims (kept apart, so a sharded axis need not be merged into another).
    """

    heads: int
    dim_head: int
    bias: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    out_bias: bool = True
    single_token_fast_path: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, context=None):
        residual = x
        inner = self.heads * self.dim_head
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name="group_norm")(x)
        ctx = x if context is None else context
        to_q = dense(inner, "to_q", self.dtype, self.param_dtype, self.bias)
        to_k = dense(inner, "to_k", self.dtype, self.param_dtype, self.bias)
        to_v = dense(inner, "to_v", self.dtype, self.param_dtype, self.bias)
        to_out = dense(residual.shape[-1], "to_out_0", self.dtype, self.param_dtype, self.out_bias)
        if self.single_token_fast_path and ctx.shape[-2] == 1:
            # Softmax over a single key is exactly 1: the output is to_out(to_v(c)) for every query.
            if self.is_initializing():
                to_q(x), to_k(ctx)
            out = to_out(to_v(ctx))
            out = jnp.broadcast_to(out, x.shape[:-1] + out.shape[-1:])
        else:
            split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.dim_head))
            out = dot_product_attention(split(to_q(x)), split(to_k(ctx)), split(to_v(ctx)), options=self.options)
            out = to_out(out.reshape(out.shape[:-2] + (inner,)))
        if self.residual_connection:
            out = out + residual
        return out


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (pre-norm, SiLU, 'default' time embedding, output_scale_factor 1).

    x (N, H, W, Cin), temb (N, T) or None -> (N, H, W, out_channels). GroupNorm is per image.
    ``use_temb`` must match whether the block owns a ``time_emb_proj``.
    """

    out_channels: int
    eps: float = 1e-6
    groups: int = 32
    use_temb: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, temb=None):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        h = nn.silu(GroupNorm(self.groups, self.eps, dt, pt, o.remats("layers"), name="norm1")(x))
        h = conv(self.out_channels, (3, 3), "conv1", dt, pt, o)(h)
        if self.use_temb:
            t = dense(self.out_channels, "time_emb_proj", dt, pt)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, dt, pt, o.remats("layers"), name="norm2")(h))
        h = conv(self.out_channels, (3, 3), "conv2", dt, pt, o)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, (1, 1), "conv_shortcut", dt, pt, o)(x)
        return x + h


class TemporalResnetBlock(nn.Module):
    """diffusers TemporalResnetBlock: Conv3d (3,1,1) along frames, GroupNorm pooled over all frames.

    x (B, F, H, W, C), temb (B, F, T) or None -> (B, F, H, W, C). In two halves (``first_half``, ``second_half``)
    that take the GroupNorm statistics from outside, for the VAE's streamed decode: every conv mixes frames only,
    so a tile of rows holding all frames can run alone once its norms' statistics are known.
    """

    out_channels: int
    eps: float = 1e-6
    groups: int = 32
    use_temb: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    def setup(self):
        dt, pt, o, c = self.dtype, self.param_dtype, self.options, self.out_channels
        self.norm1 = GroupNorm(self.groups, self.eps, dt, pt, o.remats("layers"))
        self.conv1 = conv(c, (3, 1, 1), None, dt, pt, o)
        if self.use_temb:
            self.time_emb_proj = Dense(c, dtype=dt, param_dtype=pt)
        self.norm2 = GroupNorm(self.groups, self.eps, dt, pt, o.remats("layers"))
        self.conv2 = conv(c, (3, 1, 1), None, dt, pt, o)

    def __call__(self, x, temb=None):
        if x.shape[-1] != self.out_channels:  # diffusers would add a 1x1x1 shortcut; SVD never has one
            raise ValueError(f"TemporalResnetBlock: {x.shape[-1]} -> {self.out_channels} channels is not supported")
        return self.second_half(x, self.first_half(x, temb))

    def first_half(self, x, temb=None, stats=None):
        """conv1(silu(norm1(x))) (+ the time embedding): (B, F, H, W, C); ``stats``: norm1's (mean, var)."""
        h = self.conv1(nn.silu(self.norm1(x, stats)))
        if self.use_temb:
            h = h + self.time_emb_proj(nn.silu(temb))[:, :, None, None, :]
        return h

    def second_half(self, x, h, stats=None):
        """x + conv2(silu(norm2(h))): (B, F, H, W, C); ``stats``: norm2's (mean, var)."""
        return x + self.conv2(nn.silu(self.norm2(h, stats)))


class AlphaBlender(nn.Module):
    """diffusers AlphaBlender: alpha * spatial + (1 - alpha) * temporal.

    merge_strategy: "learned" (alpha = sigmoid(mix_factor)), "learned_with_images" (alpha = 1 where
    image_only_indicator is 1, else sigmoid(mix_factor)) or "fixed" (alpha = mix_factor).
    ``switch_spatial_to_temporal_mix`` (the VAE decoder) uses 1 - alpha.

    Call: x_spatial, x_temporal of shape (B, F, ...) or (B*F, ...); image_only_indicator (B, F).
    """

    alpha: float = 0.5
    merge_strategy: str = "learned_with_images"
    switch_spatial_to_temporal_mix: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_spatial, x_temporal, image_only_indicator=None):
        if self.merge_strategy not in ("learned", "fixed", "learned_with_images"):
            raise ValueError(f"unknown merge_strategy {self.merge_strategy!r}")
        mix = param(self, "mix_factor", nn.initializers.constant(self.alpha), (1,), self.param_dtype)
        mix = mix.astype(jnp.float32)
        alpha = (mix if self.merge_strategy == "fixed" else jax.nn.sigmoid(mix)).reshape(())
        if self.merge_strategy == "learned_with_images":
            if image_only_indicator is None:
                raise ValueError("learned_with_images blending needs image_only_indicator (B, F)")
            ind = image_only_indicator
            alpha = jnp.where(ind.astype(bool), 1.0, alpha)  # (B, F)
            if x_spatial.shape[: 2] == ind.shape:  # (B, F, ...)
                alpha = alpha.reshape(ind.shape + (1,) * (x_spatial.ndim - 2))
            else:  # (B*F, ...), b-major
                alpha = alpha.reshape((-1,) + (1,) * (x_spatial.ndim - 1))
        alpha = alpha.astype(x_spatial.dtype)
        if self.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class SpatioTemporalResBlock(nn.Module):
    """diffusers SpatioTemporalResBlock: spatial ResnetBlock2D, temporal resnet, AlphaBlender.

    x (B*F, H, W, Cin) b-major, temb (B*F, T) or None, image_only_indicator (B, F) -> (B*F, H, W, out_channels).
    The three parts are attributes (``spatial_res_block``, ``temporal_res_block``, ``time_mixer``), so the VAE's
    streamed decode runs this block's own modules piece by piece.
    """

    out_channels: int
    eps: float = 1e-6
    temporal_eps: float | None = None
    merge_factor: float = 0.5
    merge_strategy: str = "learned_with_images"
    switch_spatial_to_temporal_mix: bool = False
    use_temb: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    def setup(self):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        teps = self.eps if self.temporal_eps is None else self.temporal_eps
        self.spatial_res_block = ResnetBlock2D(self.out_channels, self.eps, use_temb=self.use_temb, dtype=dt,
                                               param_dtype=pt, options=o)
        self.temporal_res_block = TemporalResnetBlock(self.out_channels, teps, use_temb=self.use_temb, dtype=dt,
                                                      param_dtype=pt, options=o)
        self.time_mixer = AlphaBlender(self.merge_factor, self.merge_strategy, self.switch_spatial_to_temporal_mix,
                                       dt, pt)

    def __call__(self, x, temb, image_only_indicator):
        b, f = image_only_indicator.shape
        h = self.spatial_res_block(x, temb)
        hs = h.reshape((b, f) + h.shape[1:])
        tt = temb.reshape(b, f, -1) if self.use_temb else None
        ht = self.temporal_res_block(hs, tt)
        return self.time_mixer(hs, ht, image_only_indicator).reshape(h.shape)


class Downsample2D(nn.Module):
    """diffusers Downsample2D with a conv (name "op" -> param ``conv``), stride 2, kernel 3.

    padding=1: symmetric (UNet). padding=0: zero-pad right/bottom by 1 first (VAE encoder).
    x (N, H, W, C) -> (N, ceil-ish H/2, W/2, out_channels).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
        return conv(self.out_channels, (3, 3), "conv", self.dtype, self.param_dtype, self.options, strides=(2, 2),
                    padding=pad)(x)


class Upsample2D(nn.Module):
    """diffusers Upsample2D with a conv: nearest x2 (or to ``output_size``), then 3x3 conv.

    (N, H, W, C) -> (N, 2H, 2W, C'), or (N, *output_size, C') with PyTorch's nearest rule src = floor(dst*in/out).
    """

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, output_size=None):
        h, w = x.shape[1:3]
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            oh, ow = output_size
            x = x[:, (np.arange(oh) * h) // oh][:, :, (np.arange(ow) * w) // ow]
        return conv(self.out_channels, (3, 3), "conv", self.dtype, self.param_dtype, self.options)(x)


def to_tokens(x):
    """(N, H, W, C) -> (N, H*W, C), row-major over (H, W) as PyTorch's view(N, C, H*W).transpose(1, 2)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0, max_period: float = 10000.0):
    """diffusers get_timestep_embedding in float32: t (N,) -> (N, dim), [cos | sin] when flip_sin_to_cos."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(jnp.float32(max_period)) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding: linear_1 -> SiLU -> linear_2. (N, in) -> (N, out_dim or time_embed_dim)."""

    time_embed_dim: int
    out_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(dense(self.time_embed_dim, "linear_1", self.dtype, self.param_dtype)(x))
        return dense(self.out_dim or self.time_embed_dim, "linear_2", self.dtype, self.param_dtype)(h)


class _DenseParams(nn.Module):
    """The parameters of a torch Linear (kernel (in, out), bias), returned instead of applied."""

    in_features: int
    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        k = param(self, "kernel", nn.initializers.lecun_normal(), (self.in_features, self.features), self.param_dtype)
        b = param(self, "bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return k, b


class _GEGLUParams(nn.Module):
    in_features: int
    inner: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        return _DenseParams(self.in_features, 2 * self.inner, self.param_dtype, name="proj")()


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU (params ``net_0/proj``, ``net_2``): x -> net_2(a * gelu_erf(g)).

    ``chunk_size``/``chunk_dim``: compute the position-wise FF over slices of ``chunk_size`` along axis
    ``chunk_dim`` in a loop (:func:`~svd_jax.models.xla_ops.map_chunks`), as diffusers' forward chunking;
    identical results, less memory. Without ``chunk_size``, a FF whose float32 hidden layer (rows x 2 inner)
    exceeds ``options.forward_chunk_bytes`` runs over slices of its rows (all leading axes flattened), except in a
    partitioned program (``options.partitioned``), where slicing a split axis would gather it.
    x (..., dim) -> (..., dim_out or dim).
    """

    mult: int = 4
    dim_out: int | None = None
    chunk_size: int | None = None
    chunk_dim: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        inner = dim * self.mult
        k1, b1 = _GEGLUParams(dim, inner, self.param_dtype, name="net_0")()
        k2, b2 = _DenseParams(inner, self.dim_out or dim, self.param_dtype, name="net_2")()
        dt = self.dtype
        k1, b1, k2, b2 = (a.astype(dt) for a in (k1, b1, k2, b2))

        def ff(h):
            a, g = jnp.split(jnp.dot(h.astype(dt), k1) + b1, 2, axis=-1)
            return jnp.dot(a * jax.nn.gelu(g, approximate=False), k2) + b2

        # remat "layers": each slice keeps only its input; its 4x-wide hidden layer is recomputed
        ff = recomputed(ff, self.options.remats("layers"))

        if self.chunk_size is None:
            budget = None if self.options.partitioned else self.options.forward_chunk_bytes
            return map_rows(ff, x, 2 * inner * 4, budget)
        ax, n = self.chunk_dim, x.shape[self.chunk_dim]
        if n % self.chunk_size:
            raise ValueError(f"forward chunking: axis {ax} of length {n} is not divisible by chunk_size "
                             f"{self.chunk_size}")
        return map_chunks(ff, x, ax, self.chunk_size)
