"""Building blocks shared by the VAE and the UNet (and the CLIP tower's norms).

Layout is channels-last: images (N, H, W, C), videos folded as (B*F, H, W, C) b-major or (B, F, H, W, C).
Norms, softmax and sigmoid run in float32 whatever the compute dtype; parameters are created in
``param_dtype`` and cast to ``dtype`` for the matmuls and convolutions.
Submodule names mirror the diffusers attribute names so that the weight converter needs no tables.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import dot_product_attention

Dtype = Any


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over channels-last input, statistics in float32 (two-pass variance).

    Statistics are taken per sample (axis 0) and group over ALL other axes, so (N, H, W, C) normalises each
    image, and (B, F, H, W, C) pools over the frames of a video, as PyTorch's 5-D GroupNorm does.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        xg = xf.reshape(x.shape[0], -1, self.num_groups, c // self.num_groups)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, in float32 (two-pass variance), explicit epsilon."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """torch.nn.Linear: kernel (in, out)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def conv(features: int, kernel, name: str, dtype: Dtype, param_dtype: Dtype, *, strides=None, padding=None,
         use_bias: bool = True) -> nn.Conv:
    """torch.nn.Conv2d/3d with explicit padding (default: 'same' for odd kernels, symmetric)."""
    kernel = tuple(kernel)
    if padding is None:
        padding = tuple((k // 2, k // 2) for k in kernel)
    return nn.Conv(features, kernel, strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class Attention(nn.Module):
    """diffusers ``Attention`` (AttnProcessor2_0 maths) on token sequences.

    Params: ``to_q``, ``to_k``, ``to_v`` (bias if ``bias``), ``to_out_0`` (always biased), optional
    ``group_norm`` applied to the query input before projection, optional residual (added after to_out).

    Call: x (N, S, query_dim), context (N, Sk, cross_dim) or None for self-attention -> (N, S, query_dim).
    """

    heads: int
    dim_head: int
    bias: bool = False
    norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    out_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        residual = x
        inner = self.heads * self.dim_head
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, name="group_norm")(x)
        ctx = x if context is None else context
        q = dense(inner, "to_q", self.dtype, self.param_dtype, self.bias)(x)
        k = dense(inner, "to_k", self.dtype, self.param_dtype, self.bias)(ctx)
        v = dense(inner, "to_v", self.dtype, self.param_dtype, self.bias)(ctx)
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))
        out = dot_product_attention(split(q), split(k), split(v))
        out = out.reshape(out.shape[:2] + (inner,))
        out = dense(residual.shape[-1], "to_out_0", self.dtype, self.param_dtype, self.out_bias)(out)
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

    @nn.compact
    def __call__(self, x, temb=None):
        dt, pt = self.dtype, self.param_dtype
        h = nn.silu(GroupNorm(self.groups, self.eps, dt, pt, name="norm1")(x))
        h = conv(self.out_channels, (3, 3), "conv1", dt, pt)(h)
        if self.use_temb:
            t = dense(self.out_channels, "time_emb_proj", dt, pt)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, dt, pt, name="norm2")(h))
        h = conv(self.out_channels, (3, 3), "conv2", dt, pt)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, (1, 1), "conv_shortcut", dt, pt)(x)
        return x + h


class TemporalResnetBlock(nn.Module):
    """diffusers TemporalResnetBlock: Conv3d (3,1,1) along frames, GroupNorm pooled over all frames.

    x (B, F, H, W, C), temb (B, F, T) or None -> (B, F, H, W, C).
    """

    out_channels: int
    eps: float = 1e-6
    groups: int = 32
    use_temb: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        dt, pt = self.dtype, self.param_dtype
        if x.shape[-1] != self.out_channels:  # diffusers would add a 1x1x1 shortcut; SVD never has one
            raise ValueError(f"TemporalResnetBlock: {x.shape[-1]} -> {self.out_channels} channels is not supported")
        h = nn.silu(GroupNorm(self.groups, self.eps, dt, pt, name="norm1")(x))
        h = conv(self.out_channels, (3, 1, 1), "conv1", dt, pt)(h)
        if self.use_temb:
            t = dense(self.out_channels, "time_emb_proj", dt, pt)(nn.silu(temb))
            h = h + t[:, :, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, dt, pt, name="norm2")(h))
        h = conv(self.out_channels, (3, 1, 1), "conv2", dt, pt)(h)
        return x + h


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
        mix = self.param("mix_factor", nn.initializers.constant(self.alpha), (1,), self.param_dtype)
        mix = mix.astype(jnp.float32)
        if self.merge_strategy == "fixed":
            alpha = mix.reshape(())
        else:
            alpha = jax.nn.sigmoid(mix).reshape(())
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
    """

    out_channels: int
    eps: float = 1e-6
    temporal_eps: Optional[float] = None
    merge_factor: float = 0.5
    merge_strategy: str = "learned_with_images"
    switch_spatial_to_temporal_mix: bool = False
    use_temb: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, image_only_indicator):
        dt, pt = self.dtype, self.param_dtype
        b, f = image_only_indicator.shape
        h = ResnetBlock2D(self.out_channels, self.eps, use_temb=self.use_temb, dtype=dt, param_dtype=pt,
                          name="spatial_res_block")(x, temb)
        hs = h.reshape((b, f) + h.shape[1:])
        tt = temb.reshape(b, f, -1) if self.use_temb else None
        teps = self.eps if self.temporal_eps is None else self.temporal_eps
        ht = TemporalResnetBlock(self.out_channels, teps, use_temb=self.use_temb, dtype=dt, param_dtype=pt,
                                 name="temporal_res_block")(hs, tt)
        out = AlphaBlender(self.merge_factor, self.merge_strategy, self.switch_spatial_to_temporal_mix, dt, pt,
                           name="time_mixer")(hs, ht, image_only_indicator)
        return out.reshape(h.shape)


class Downsample2D(nn.Module):
    """diffusers Downsample2D with a conv (name "op" -> param ``conv``), stride 2, kernel 3.

    padding=1: symmetric (UNet). padding=0: zero-pad right/bottom by 1 first (VAE encoder).
    x (N, H, W, C) -> (N, ceil-ish H/2, W/2, out_channels).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
        return conv(self.out_channels, (3, 3), "conv", self.dtype, self.param_dtype, strides=(2, 2), padding=pad)(x)


class Upsample2D(nn.Module):
    """diffusers Upsample2D with a conv: nearest x2 (exact repeat), then 3x3 conv. (N, H, W, C) -> (N, 2H, 2W, C')."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, (3, 3), "conv", self.dtype, self.param_dtype)(x)


def to_tokens(x):
    """(N, H, W, C) -> (N, H*W, C), row-major over (H, W) as PyTorch's view(N, C, H*W).transpose(1, 2)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])
