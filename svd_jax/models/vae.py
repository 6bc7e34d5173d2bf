"""AutoencoderKLTemporalDecoder: the SVD VAE (2-D encoder + quant_conv, temporal decoder), channels-last.

Mirrors diffusers' ``AutoencoderKLTemporalDecoder``: the encoder is the SD VAE encoder
(DownEncoderBlock2D levels, right/bottom-padded stride-2 downsamplers, single-head mid attention), the
decoder interleaves per-frame spatial resnets with temporal resnets (Conv3d (3,1,1), GroupNorm pooled over
frames) mixed by a learned AlphaBlender in the decoder's direction, and ends with ``time_conv_out``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ..options import DEFAULT_OPTIONS, ModelOptions
from ..weights import DIFFUSERS_WEIGHTS, CheckpointError, PretrainedMixin, check_class_name, config_fields, sgm
from .layers import (
    Attention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    SpatioTemporalResBlock,
    Upsample2D,
    conv,
    to_tokens,
)
from .xla_ops import barrier_slice, map_chunks

Dtype = Any

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior. mean, logvar: (N, h, w, latent_channels); logvar clamped to [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def mode(self):
        """The posterior mean (what the SVD pipeline uses as image latents), (N, h, w, C)."""
        return self.mean

    def sample(self, rng):
        """mean + std * N(0, 1) drawn from the jax key ``rng``, (N, h, w, C)."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def kl(self):
        """KL divergence to N(0, I) per sample, (N,)."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _attention_1head(channels: int, dt, pt, o, name: str) -> Attention:
    # The VAE's attention blocks: one head of width C, GroupNorm(32, eps 1e-6) first, biased, residual.
    return Attention(heads=1, dim_head=channels, bias=True, norm_num_groups=32, norm_eps=1e-6,
                     residual_connection=True, dtype=dt, param_dtype=pt, options=o, name=name)


def _image_attention(attn: Attention, x):
    """Apply a token attention to images (N, H, W, C)."""
    return attn(to_tokens(x)).reshape(x.shape)


class DownEncoderBlock2D(nn.Module):
    """diffusers DownEncoderBlock2D / AttnDownEncoderBlock2D: resnets (+ 1-head attentions), downsampler."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    add_attention: bool = False
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, h):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.out_channels, 1e-6, self.groups, dtype=dt, param_dtype=pt, options=o,
                              name=f"resnets_{j}")(h)
            if self.add_attention:
                h = _image_attention(_attention_1head(self.out_channels, dt, pt, o, f"attentions_{j}"), h)
        if self.add_downsample:  # VAE encoder: pad right/bottom only (padding=0)
            h = Downsample2D(self.out_channels, padding=0, dtype=dt, param_dtype=pt, options=o,
                             name="downsamplers_0")(h)
        return h


class UNetMidBlock2D(nn.Module):
    """diffusers UNetMidBlock2D (temb None): resnet, 1-head attention, resnet."""

    channels: int
    add_attention: bool = True
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, h):
        dt, pt, o, c = self.dtype, self.param_dtype, self.options, self.channels
        h = ResnetBlock2D(c, 1e-6, self.groups, dtype=dt, param_dtype=pt, options=o, name="resnets_0")(h)
        if self.add_attention:
            h = _image_attention(_attention_1head(c, dt, pt, o, "attentions_0"), h)
        return ResnetBlock2D(c, 1e-6, self.groups, dtype=dt, param_dtype=pt, options=o, name="resnets_1")(h)


class Encoder(nn.Module):
    """diffusers ``Encoder`` (double_z): (N, H, W, in) -> (N, H/2^(L-1), W/2^(L-1), 2 * out_channels)."""

    out_channels: int = 4
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x):
        dt, pt, o, g = self.dtype, self.param_dtype, self.options, self.norm_num_groups
        h = conv(self.block_out_channels[0], (3, 3), "conv_in", dt, pt, o)(x)
        n = len(self.block_out_channels)
        for i, (kind, ch) in enumerate(zip(self.down_block_types, self.block_out_channels)):
            h = DownEncoderBlock2D(ch, self.layers_per_block, i < n - 1, kind == "AttnDownEncoderBlock2D", g,
                                   dt, pt, o, name=f"down_blocks_{i}")(h)
        c = self.block_out_channels[-1]
        h = UNetMidBlock2D(c, self.mid_block_add_attention, g, dt, pt, o, name="mid_block")(h)
        h = nn.silu(GroupNorm(g, 1e-6, dt, pt, name="conv_norm_out")(h))
        return conv(2 * self.out_channels, (3, 3), "conv_out", dt, pt, o)(h)


def _decoder_resblock(ch, dt, pt, o, name=None):
    return SpatioTemporalResBlock(
        ch, eps=1e-6, temporal_eps=1e-5, merge_factor=0.0, merge_strategy="learned",
        switch_spatial_to_temporal_mix=True, use_temb=False, dtype=dt, param_dtype=pt, options=o, name=name,
    )


class MidBlockTemporalDecoder(nn.Module):
    """diffusers MidBlockTemporalDecoder: (B*F, h, w, C), indicator (B, F) -> same shape.

    diffusers runs resnets[0], then zip(resnets[1:], [attention]): exactly one attention and resnets[1].
    Further resnets (or the attention, when num_layers == 1) own weights but never run; they are created at
    init only, so the weights still round-trip and the output matches.
    """

    channels: int
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, h, ind):
        dt, pt, o, c = self.dtype, self.param_dtype, self.options, self.channels
        resnets = [_decoder_resblock(c, dt, pt, o, f"resnets_{j}") for j in range(self.num_layers)]
        attn = _attention_1head(c, dt, pt, o, "attentions_0")
        h = resnets[0](h, None, ind)
        if len(resnets) > 1:
            h = resnets[1](_image_attention(attn, h), None, ind)
        if self.is_initializing():
            for r in resnets[2:]:
                r(h, None, ind)
            if len(resnets) == 1:
                _image_attention(attn, h)
        return h


class UpBlockTemporalDecoder(nn.Module):
    """diffusers UpBlockTemporalDecoder: spatio-temporal resnets, then nearest x2 + conv."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    def setup(self):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        self.resnets = [_decoder_resblock(self.out_channels, dt, pt, o) for _ in range(self.num_layers)]
        self.upsamplers = [Upsample2D(self.out_channels, dt, pt, o)] if self.add_upsample else []

    def __call__(self, h, ind):
        for r in self.resnets:
            h = r(h, None, ind)
        for up in self.upsamplers:
            h = up(h)
        return h


class TemporalDecoder(nn.Module):
    """diffusers ``TemporalDecoder``: z (B*F, h, w, in) b-major, num_frames F -> (B*F, 8h, 8w, out).

    In three parts, each a method, that the plain call and the streamed decode (:func:`decode_streamed`) both
    run: :meth:`head` (conv_in, mid block), the up blocks' own modules (``up_blocks[i].resnets``,
    ``.upsamplers``), :meth:`frame_out` (norm, SiLU, conv_out per frame) and :meth:`video_out` (time_conv_out).
    ``options.constrain`` pins activations at block boundaries.
    """

    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    def setup(self):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        top, n = self.block_out_channels[-1], len(self.block_out_channels)
        self.conv_in = conv(top, (3, 3), None, dt, pt, o)
        self.mid_block = MidBlockTemporalDecoder(top, self.layers_per_block, dt, pt, o)
        self.up_blocks = [UpBlockTemporalDecoder(ch, self.layers_per_block + 1, i < n - 1, dt, pt, o)
                          for i, ch in enumerate(reversed(self.block_out_channels))]
        self.conv_norm_out = GroupNorm(32, 1e-6, dt, pt)
        self.conv_out = conv(self.out_channels, (3, 3), None, dt, pt, o)
        self.time_conv_out = conv(self.out_channels, (3, 1, 1), None, dt, pt, o)

    def __call__(self, z, num_frames: int):
        c = self.options.constrain_activations
        h, ind = self.head(z, num_frames)
        for blk in self.up_blocks:
            h = c(blk(h, ind))
        return self.video_out(self.frame_out(h), num_frames)

    def indicator(self, n: int, num_frames: int):
        """image_only_indicator (videos, num_frames) of n frames; the decoder's "learned" mixers ignore it."""
        return jnp.zeros((n // num_frames, num_frames), self.dtype)

    def head(self, z, num_frames: int):
        """conv_in and the mid block: z (B*F, h, w, in) -> ((B*F, h, w, C_top), indicator (B, F))."""
        c = self.options.constrain_activations
        ind = self.indicator(z.shape[0], num_frames)
        h = c(self.conv_in(z))
        return c(self.mid_block(h, ind)), ind

    def frame_out(self, h):
        """The per-frame output layers: (N, H, W, C0) -> (N, H, W, out)."""
        return self.conv_out(nn.silu(self.conv_norm_out(h)))

    def video_out(self, h, num_frames: int):
        """time_conv_out, a per-pixel conv over each video's frames: (B*F, H, W, out) -> same."""
        v = h.reshape((-1, num_frames) + h.shape[1:])
        return self.time_conv_out(v).reshape(h.shape)


class AutoencoderKLTemporalDecoder(PretrainedMixin, nn.Module):
    """The SVD VAE. Fields are diffusers' config keys (build from ``config.json`` with ``from_config``).

    Methods (pass as ``module.apply(variables, ..., method="encode")``):
      * ``encode(x)``: x (N, H, W, in_channels) in [-1, 1] -> :class:`DiagonalGaussian` with
        mean/logvar (N, H/2^(L-1), W/2^(L-1), latent_channels), L = len(block_out_channels) (8x for SVD).
      * ``decode(z, num_frames)``: z (N, h, w, latent_channels) with N a multiple of num_frames and each video's
        frames consecutive -> (N, H, W, out_channels). No 1/scaling_factor applied here (the pipeline does it).
      * ``__call__(x, num_frames=1)``: decode(encode(x).mode()), as diffusers' forward.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    _weights_names = (DIFFUSERS_WEIGHTS,)
    _sgm_prefixes = (sgm.VAE_DECODER_PREFIX, sgm.VAE_ENCODER_PREFIX)

    _sgm_rename = staticmethod(sgm.vae_sgm_name)
    _single_file_config = "SVD_VAE"  # the svd_jax.configs entry from_single_file defaults to

    @classmethod
    def from_config(cls, config, dtype=jnp.float32, options: ModelOptions = DEFAULT_OPTIONS):
        """Build from a diffusers ``vae/config.json`` dict; unsupported values raise a clear error."""
        check_class_name(config, "AutoencoderKLTemporalDecoder")
        kw = config_fields(cls, config)
        module = cls(**kw, dtype=dtype, param_dtype=dtype, options=options)
        module.validate()
        return module

    def validate(self):
        """Check the config values against what the architecture supports."""
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        if bad:
            raise CheckpointError(f"VAE down_block_types {bad} not supported; supported: {DOWN_BLOCK_TYPES}")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise CheckpointError(
                f"VAE config: {len(self.down_block_types)} down_block_types but "
                f"{len(self.block_out_channels)} block_out_channels; they must be equal"
            )
        odd = [c for c in self.block_out_channels if c % 32]
        if odd:
            raise CheckpointError(f"VAE block_out_channels {list(self.block_out_channels)}: each must be a multiple "
                                  "of 32 (GroupNorm groups)")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        self.encoder = Encoder(self.latent_channels, tuple(self.down_block_types), tuple(self.block_out_channels),
                               self.layers_per_block, dtype=dt, param_dtype=pt, options=o)
        self.quant_conv = conv(2 * self.latent_channels, (1, 1), None, dt, pt, o)
        self.decoder = TemporalDecoder(self.out_channels, tuple(self.block_out_channels), self.layers_per_block,
                                       dtype=dt, param_dtype=pt, options=o)

    def encode(self, x) -> DiagonalGaussian:
        """x (N, H, W, in_channels) in [-1, 1] -> posterior with mean/logvar (N, H/8, W/8, latent_channels)."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            channels_first = x.ndim == 4 and x.shape[1] == self.in_channels
            hint = " (channels-first? transpose to (N, H, W, C))" if channels_first else ""
            raise ValueError(f"VAE encode expects images (N, H, W, {self.in_channels}); got {tuple(x.shape)}{hint}")
        moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z, num_frames: int = 1):
        """z (N, h, w, latent_channels), N = videos x num_frames, b-major -> images (N, 8h, 8w, out_channels)."""
        self.check_latents(z, num_frames)
        return self.decoder(z.astype(self.dtype), num_frames)

    def check_latents(self, z, num_frames: int):
        """ValueError unless z is (videos x num_frames, h, w, latent_channels)."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int; got {num_frames!r}")
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            channels_first = z.ndim == 4 and z.shape[1] == self.latent_channels
            hint = " (channels-first? transpose to (N, h, w, C))" if channels_first else ""
            raise ValueError(f"VAE decode expects latents (N, h, w, {self.latent_channels}); "
                             f"got {tuple(z.shape)}{hint}")
        if z.shape[0] % num_frames:
            raise ValueError(
                f"VAE decode: {z.shape[0]} latents are not a whole number of videos of num_frames={num_frames}"
            )

    def __call__(self, x, num_frames: int = 1):
        return self.decode(self.encode(x).mode(), num_frames)

    def init_params_abstract(self):
        """The parameter tree as ``jax.ShapeDtypeStruct``s (no compute, no memory)."""
        s = 2 * self.downscale
        x = jax.ShapeDtypeStruct((1, s, s, self.in_channels), self.dtype)
        return jax.eval_shape(lambda r, x: self.init(r, x)["params"], jax.random.PRNGKey(0), x)


# ---------------------------------------------------------------------------------------------------------------
# Streamed decode: the same maths as TemporalDecoder, in a fraction of the memory
# ---------------------------------------------------------------------------------------------------------------

def _divisor_at_most(n: int, target: int) -> int:
    return max(d for d in range(1, max(1, min(n, target)) + 1) if n % d == 0)


def _per_frame(fn, x, frame_chunk: int | None, slice_bytes: int):
    """fn over (c, H, W, C) chunks of x (N, H, W, C), one chunk at a time: c divides N, c = frame_chunk or the
    most frames whose input and output each stay within slice_bytes."""
    if frame_chunk is None:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
        per_frame = max(math.prod(x.shape[1:]) * x.dtype.itemsize, out.size * out.dtype.itemsize)
        frame_chunk = max(1, slice_bytes // per_frame)
    return map_chunks(fn, x, 0, _divisor_at_most(x.shape[0], frame_chunk))


def _temporal_tiled(block: SpatioTemporalResBlock, hs, ind, row_tile: int | None, slice_bytes: int):
    """The temporal half and mixer of a (bound) decoder ``block`` on hs (N, H, W, C), in row tiles.

    The temporal resnet's convolutions are (3, 1, 1): each tile of rows holding every frame runs alone once its
    GroupNorms' statistics (pooled over frames and rows) are known; they are summed over the tiles first (two
    passes, as GroupNorm). Tiles of ``row_tile`` rows, or of the most rows that stay within ``slice_bytes``.
    """
    n, H, W, C = hs.shape
    b, num_frames = ind.shape
    if row_tile is None:
        row_tile = max(1, slice_bytes // (n * W * C * hs.dtype.itemsize))
    t = _divisor_at_most(H, row_tile)
    x5 = hs.reshape(b, num_frames, H, W, C)
    tile = lambda i: barrier_slice(x5, i * t, t, 2)  # (B, F, t, W, C): rows [i t, (i + 1) t) of every frame
    temporal, mixer = block.temporal_res_block, block.time_mixer
    sum_tiles = lambda fn: jax.lax.map(lambda i: fn(tile(i)), jnp.arange(H // t)).sum(axis=0)

    def stats(norm, fn):  # (mean, var) of fn(x5) (B, G), accumulated tile by tile
        count = norm.count(x5.shape)
        mean = sum_tiles(lambda x: norm.partial_sums(fn(x))) / count
        return mean, sum_tiles(lambda x: norm.partial_sums(fn(x), mean)) / count

    stats1 = stats(temporal.norm1, lambda x: x)
    h1 = lambda x: temporal.first_half(x, None, stats1)
    stats2 = stats(temporal.norm2, h1)
    out = lambda x: mixer(x, temporal.second_half(x, h1(x), stats2), ind)
    return map_chunks(out, x5, 2, t).reshape(n, H, W, C)


SLICE_BYTES = 256 * 2**20  # decode_streamed's default slice size (input or output of one step)


def _streamed(vae: AutoencoderKLTemporalDecoder, z, num_frames: int, frame_chunk, row_tile, slice_bytes):
    # On the bound VAE: its decoder's own modules, in the decoder's order, run in slices.
    vae.check_latents(z, num_frames)
    dec = vae.decoder
    h, ind = dec.head(z.astype(vae.dtype), num_frames)
    pending = None  # the previous block's upsampler, run in the same frame chunks as the next spatial resnet
    for blk in dec.up_blocks:
        for r in blk.resnets:
            def stage(x, pre=pending, spatial=r.spatial_res_block):
                return spatial(x if pre is None else pre(x))

            pending = None
            h = _per_frame(stage, h, frame_chunk, slice_bytes)
            h = _temporal_tiled(r, h, ind, row_tile, slice_bytes)
        pending = blk.upsamplers[0] if blk.upsamplers else None
    h = _per_frame(dec.frame_out, h, frame_chunk, slice_bytes)
    return dec.video_out(h, num_frames)


def decode_streamed(vae: AutoencoderKLTemporalDecoder, params, z, num_frames: int,
                    frame_chunk: int | None = None, row_tile: int | None = None,
                    slice_bytes: int = SLICE_BYTES):
    """``vae.decode(z, num_frames)`` computed layer by layer in slices, so that no layer's whole activations and
    temporaries exist at once: the same maths (up to float summation order), for one device (no mesh).

    It runs the decoder's own modules (:class:`TemporalDecoder`: head, up blocks' resnets and upsamplers, frame
    and video output), so every constant comes from the one module configuration. Per-frame layers (spatial
    resnets, each upsampler fused with the next spatial resnet, the output norm and conv) run ``frame_chunk``
    frames at a time; temporal resnets and their mixers run in tiles of ``row_tile`` rows holding all frames (the
    GroupNorm statistics, pooled over frames and rows, are summed over the tiles first). By default both are as
    large as ``slice_bytes`` allows at each resolution (SVD-XT, bf16: one full-resolution frame, all 25 frames at
    the lowest level), so small levels run in few steps. The conv_in, the mid block (lowest resolution) and
    time_conv_out (3 channels) run whole.

    Args:
      params: the VAE's parameters (``{"encoder": ..., "decoder": ..., ...}``).
      z: (N, h, w, latent_channels), N = videos x num_frames, b-major.
    Returns:
      (N, 8h, 8w, out_channels), as ``decode``.
    """
    return vae.apply({"params": params}, z, num_frames, frame_chunk, row_tile, slice_bytes, method=_streamed)
