"""AutoencoderKLTemporalDecoder: the SVD VAE (2-D encoder + quant_conv, temporal decoder), channels-last.

Mirrors diffusers' ``AutoencoderKLTemporalDecoder`` (SPEC §3): the encoder is the SD VAE encoder
(DownEncoderBlock2D levels, right/bottom-padded stride-2 downsamplers, single-head mid attention), the
decoder interleaves per-frame spatial resnets with temporal resnets (Conv3d (3,1,1), GroupNorm pooled over
frames) mixed by a learned AlphaBlender in the decoder's direction, and ends with ``time_conv_out``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ..weights import CheckpointError, DIFFUSERS_WEIGHTS, PretrainedMixin, check_class_name, config_fields
from .layers import (
    Attention,
    Conv,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    SpatioTemporalResBlock,
    Upsample2D,
    barrier_slice,
    conv,
    group_normalize,
    map_chunks,
    to_tokens,
)

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


def _attention_1head(channels: int, dt, pt, name: str) -> Attention:
    # The VAE's attention blocks: one head of width C, GroupNorm(32, eps 1e-6) first, biased, residual.
    return Attention(heads=1, dim_head=channels, bias=True, norm_num_groups=32, norm_eps=1e-6,
                     residual_connection=True, dtype=dt, param_dtype=pt, name=name)


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

    @nn.compact
    def __call__(self, h):
        dt, pt = self.dtype, self.param_dtype
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.out_channels, 1e-6, self.groups, dtype=dt, param_dtype=pt, name=f"resnets_{j}")(h)
            if self.add_attention:
                h = _image_attention(_attention_1head(self.out_channels, dt, pt, f"attentions_{j}"), h)
        if self.add_downsample:  # VAE encoder: pad right/bottom only (padding=0)
            h = Downsample2D(self.out_channels, padding=0, dtype=dt, param_dtype=pt, name="downsamplers_0")(h)
        return h


class UNetMidBlock2D(nn.Module):
    """diffusers UNetMidBlock2D (temb None): resnet, 1-head attention, resnet."""

    channels: int
    add_attention: bool = True
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        dt, pt, c = self.dtype, self.param_dtype, self.channels
        h = ResnetBlock2D(c, 1e-6, self.groups, dtype=dt, param_dtype=pt, name="resnets_0")(h)
        if self.add_attention:
            h = _image_attention(_attention_1head(c, dt, pt, "attentions_0"), h)
        return ResnetBlock2D(c, 1e-6, self.groups, dtype=dt, param_dtype=pt, name="resnets_1")(h)


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

    @nn.compact
    def __call__(self, x):
        dt, pt, g = self.dtype, self.param_dtype, self.norm_num_groups
        h = conv(self.block_out_channels[0], (3, 3), "conv_in", dt, pt)(x)
        n = len(self.block_out_channels)
        for i, (kind, ch) in enumerate(zip(self.down_block_types, self.block_out_channels)):
            h = DownEncoderBlock2D(ch, self.layers_per_block, i < n - 1, kind == "AttnDownEncoderBlock2D", g,
                                   dt, pt, name=f"down_blocks_{i}")(h)
        c = self.block_out_channels[-1]
        h = UNetMidBlock2D(c, self.mid_block_add_attention, g, dt, pt, name="mid_block")(h)
        h = nn.silu(GroupNorm(g, 1e-6, dt, pt, name="conv_norm_out")(h))
        return conv(2 * self.out_channels, (3, 3), "conv_out", dt, pt)(h)


def _decoder_resblock(ch, dt, pt, name):
    return SpatioTemporalResBlock(
        ch, eps=1e-6, temporal_eps=1e-5, merge_factor=0.0, merge_strategy="learned",
        switch_spatial_to_temporal_mix=True, use_temb=False, dtype=dt, param_dtype=pt, name=name,
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

    @nn.compact
    def __call__(self, h, ind):
        dt, pt, c = self.dtype, self.param_dtype, self.channels
        resnets = [_decoder_resblock(c, dt, pt, f"resnets_{j}") for j in range(self.num_layers)]
        attn = _attention_1head(c, dt, pt, "attentions_0")
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

    @nn.compact
    def __call__(self, h, ind):
        dt, pt = self.dtype, self.param_dtype
        for j in range(self.num_layers):
            h = _decoder_resblock(self.out_channels, dt, pt, f"resnets_{j}")(h, None, ind)
        if self.add_upsample:
            h = Upsample2D(self.out_channels, dt, pt, name="upsamplers_0")(h)
        return h


class TemporalDecoder(nn.Module):
    """diffusers ``TemporalDecoder``: z (B*F, h, w, in) b-major, num_frames F -> (B*F, 8h, 8w, out)."""

    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    constrain: Optional[Any] = None  # hook (N, h, w, C) -> same, called at block boundaries (sharding.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, num_frames: int):
        dt, pt = self.dtype, self.param_dtype
        ind = jnp.zeros((z.shape[0] // num_frames, num_frames), dt)  # image_only_indicator; "learned" ignores it
        top = self.block_out_channels[-1]
        c = self.constrain or (lambda a: a)
        h = c(conv(top, (3, 3), "conv_in", dt, pt)(z))
        h = c(MidBlockTemporalDecoder(top, self.layers_per_block, dt, pt, name="mid_block")(h, ind))
        n = len(self.block_out_channels)
        for i, ch in enumerate(reversed(self.block_out_channels)):
            h = UpBlockTemporalDecoder(ch, self.layers_per_block + 1, i < n - 1, dt, pt, name=f"up_blocks_{i}")(h, ind)
            h = c(h)
        h = nn.silu(GroupNorm(32, 1e-6, dt, pt, name="conv_norm_out")(h))
        h = conv(self.out_channels, (3, 3), "conv_out", dt, pt)(h)
        v = h.reshape((-1, num_frames) + h.shape[1:])  # (B, F, H, W, C): per-pixel conv over frames
        v = conv(self.out_channels, (3, 1, 1), "time_conv_out", dt, pt)(v)
        return v.reshape(h.shape)


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
    constrain: Optional[Any] = None  # sharding hook for the decoder's activations (sharding.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    _weights_names = (DIFFUSERS_WEIGHTS,)

    @classmethod
    def from_config(cls, config, dtype=jnp.float32):
        """Build from a diffusers ``vae/config.json`` dict; unsupported values raise a clear error."""
        check_class_name(config, "AutoencoderKLTemporalDecoder")
        kw = config_fields(cls, config)
        module = cls(**kw, dtype=dtype, param_dtype=dtype)
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
            raise CheckpointError(f"VAE block_out_channels {list(self.block_out_channels)}: each must be a multiple of 32 (GroupNorm groups)")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        dt, pt = self.dtype, self.param_dtype
        self.encoder = Encoder(self.latent_channels, tuple(self.down_block_types), tuple(self.block_out_channels),
                               self.layers_per_block, dtype=dt, param_dtype=pt)
        self.quant_conv = Conv(2 * self.latent_channels, (1, 1), dtype=dt, param_dtype=pt)
        self.decoder = TemporalDecoder(self.out_channels, tuple(self.block_out_channels), self.layers_per_block,
                                       self.constrain, dtype=dt, param_dtype=pt)

    def encode(self, x) -> DiagonalGaussian:
        """x (N, H, W, in_channels) in [-1, 1] -> posterior with mean/logvar (N, H/8, W/8, latent_channels)."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            hint = " (channels-first? transpose to (N, H, W, C))" if x.ndim == 4 and x.shape[1] == self.in_channels else ""
            raise ValueError(f"VAE encode expects images (N, H, W, {self.in_channels}); got {tuple(x.shape)}{hint}")
        moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z, num_frames: int = 1):
        """z (N, h, w, latent_channels), N = videos x num_frames, b-major -> images (N, 8h, 8w, out_channels)."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int; got {num_frames!r}")
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            hint = " (channels-first? transpose to (N, h, w, C))" if z.ndim == 4 and z.shape[1] == self.latent_channels else ""
            raise ValueError(f"VAE decode expects latents (N, h, w, {self.latent_channels}); got {tuple(z.shape)}{hint}")
        if z.shape[0] % num_frames:
            raise ValueError(
                f"VAE decode: {z.shape[0]} latents are not a whole number of videos of num_frames={num_frames}"
            )
        return self.decoder(z.astype(self.dtype), num_frames)

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


def _per_frame(fn, x, frame_chunk: Optional[int], slice_bytes: int):
    """fn over (c, H, W, C) chunks of x (N, H, W, C), one chunk at a time: c divides N, c = frame_chunk or the
    most frames whose input and output each stay within slice_bytes."""
    if frame_chunk is None:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
        per_frame = max(math.prod(x.shape[1:]) * x.dtype.itemsize, out.size * out.dtype.itemsize)
        frame_chunk = max(1, slice_bytes // per_frame)
    return map_chunks(fn, x, 0, _divisor_at_most(x.shape[0], frame_chunk))


def _group_sum(x, groups: int):
    """x (B, F, t, W, C) -> float32 sums per (video, channel group), (B, G)."""
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    return xg.sum(axis=(1, 2, 3, 5))


def _group_norm(x, mean, var, p, eps: float, dtype):
    """GroupNorm of x (B, F, t, W, C) with float32 statistics (B, G) taken over all of a video's rows."""
    return group_normalize(x, mean[:, None, None, None, :, None], var[:, None, None, None, :, None], p["scale"],
                           p["bias"], eps, dtype)


def _temporal_block_tiled(pr, hs, num_frames: int, row_tile: Optional[int], slice_bytes: int, dt, pt,
                          groups: int = 32, eps: float = 1e-5):
    """SpatioTemporalResBlock's temporal half and mixer (decoder settings) on hs (N, H, W, C), in row tiles.

    The temporal resnet's convolutions are (3, 1, 1): each row tile holds every frame, so only its GroupNorms
    need all rows, and their statistics are summed over the tiles first (two passes, as layers.GroupNorm).
    Tiles of ``row_tile`` rows, or of the most rows that stay within ``slice_bytes``.
    """
    n, H, W, C = hs.shape
    b = n // num_frames
    if row_tile is None:
        row_tile = max(1, slice_bytes // (n * W * C * hs.dtype.itemsize))
    t = _divisor_at_most(H, row_tile)
    x5 = hs.reshape(b, num_frames, H, W, C)
    tile = lambda i: barrier_slice(x5, i * t, t, 2)  # (B, F, t, W, C): rows [i t, (i + 1) t) of every frame
    nt = H // t
    count = num_frames * H * W * (C // groups)
    p = pr["temporal_res_block"]
    conv_t = Conv(C, (3, 1, 1), dtype=dt, param_dtype=pt)
    sum_tiles = lambda fn: jax.lax.map(lambda i: fn(tile(i)), jnp.arange(nt)).sum(axis=0)

    mean1 = sum_tiles(lambda x: _group_sum(x, groups)) / count
    var1 = sum_tiles(lambda x: _group_sum(jnp.square(x.astype(jnp.float32) - _bcast(mean1, groups, C)), groups)) / count

    def h1(x):
        return conv_t.apply({"params": p["conv1"]}, nn.silu(_group_norm(x, mean1, var1, p["norm1"], eps, dt)))

    mean2 = sum_tiles(lambda x: _group_sum(h1(x), groups)) / count
    var2 = sum_tiles(lambda x: _group_sum(jnp.square(h1(x).astype(jnp.float32) - _bcast(mean2, groups, C)),
                                          groups)) / count
    alpha = 1.0 - jax.nn.sigmoid(pr["time_mixer"]["mix_factor"].astype(jnp.float32)).reshape(()).astype(dt)

    def out(x):
        h2 = conv_t.apply({"params": p["conv2"]}, nn.silu(_group_norm(h1(x), mean2, var2, p["norm2"], eps, dt)))
        return alpha * x + (1.0 - alpha) * (x + h2)  # AlphaBlender, "learned", switched to the temporal side

    return map_chunks(out, x5, 2, t).reshape(n, H, W, C)


def _bcast(stat, groups: int, channels: int):
    """(B, G) group statistics -> broadcastable against (B, F, t, W, C) as float32 per channel."""
    return jnp.repeat(stat, channels // groups, axis=-1)[:, None, None, None, :]


SLICE_BYTES = 256 * 2**20  # decode_streamed's default slice size (input or output of one step)


def decode_streamed(vae: AutoencoderKLTemporalDecoder, params, z, num_frames: int,
                    frame_chunk: Optional[int] = None, row_tile: Optional[int] = None,
                    slice_bytes: int = SLICE_BYTES):
    """``vae.decode(z, num_frames)`` computed layer by layer in slices, so that no layer's whole activations and
    temporaries exist at once: the same maths (up to float summation order), for one device (no mesh).

    Per-frame layers (spatial resnets, each upsampler fused with the next spatial resnet, the output norm and
    conv) run ``frame_chunk`` frames at a time; temporal resnets and their mixers run in tiles of ``row_tile``
    rows holding all frames (the GroupNorm statistics, pooled over frames and rows, are summed over the tiles
    first). By default both are as large as ``slice_bytes`` allows at each resolution (SVD-XT, bf16: one
    full-resolution frame, all 25 frames at the lowest level), so small levels run in few steps. The conv_in,
    the mid block (lowest resolution) and time_conv_out (3 channels) run whole.

    Args:
      params: the VAE's parameters (``{"encoder": ..., "decoder": ..., ...}``).
      z: (N, h, w, latent_channels), N = videos x num_frames, b-major.
    Returns:
      (N, 8h, 8w, out_channels), as ``decode``.
    """
    if z.ndim != 4 or z.shape[0] % num_frames:
        raise ValueError(f"decode_streamed: z must be (videos x num_frames, h, w, C); got {tuple(z.shape)}")
    dt, pt = vae.dtype, vae.param_dtype
    p = params["decoder"]
    b = z.shape[0] // num_frames
    ind = jnp.zeros((b, num_frames), dt)
    chans = list(reversed(vae.block_out_channels))
    h = Conv(chans[0], (3, 3), dtype=dt, param_dtype=pt).apply({"params": p["conv_in"]}, z.astype(dt))
    h = MidBlockTemporalDecoder(chans[0], vae.layers_per_block, dt, pt).apply({"params": p["mid_block"]}, h, ind)
    pending = None  # the previous block's upsampler, run in the same frame chunks as the next spatial resnet
    for i, ch in enumerate(chans):
        pb = p[f"up_blocks_{i}"]
        for j in range(vae.layers_per_block + 1):
            pr = pb[f"resnets_{j}"]
            spatial = ResnetBlock2D(ch, 1e-6, use_temb=False, dtype=dt, param_dtype=pt)

            def stage(x, pre=pending, spatial=spatial, ps=pr["spatial_res_block"]):
                return spatial.apply({"params": ps}, x if pre is None else pre(x))

            pending = None
            h = _per_frame(stage, h, frame_chunk, slice_bytes)
            h = _temporal_block_tiled(pr, h, num_frames, row_tile, slice_bytes, dt, pt)
        if i < len(chans) - 1:
            up = Upsample2D(ch, dt, pt)
            pending = lambda x, up=up, pu=pb["upsamplers_0"]: up.apply({"params": pu}, x)
    norm = GroupNorm(32, 1e-6, dt, pt)
    conv_out = Conv(vae.out_channels, (3, 3), dtype=dt, param_dtype=pt)
    h = _per_frame(lambda x: conv_out.apply({"params": p["conv_out"]},
                                            nn.silu(norm.apply({"params": p["conv_norm_out"]}, x))), h, frame_chunk,
                   slice_bytes)
    v = h.reshape((b, num_frames) + h.shape[1:])
    v = Conv(vae.out_channels, (3, 1, 1), dtype=dt, param_dtype=pt).apply({"params": p["time_conv_out"]}, v)
    return v.reshape(h.shape)
