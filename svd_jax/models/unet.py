"""UNetSpatioTemporalConditionModel: the SVD denoiser, channels-last.

Mirrors diffusers' ``UNetSpatioTemporalConditionModel``: frames are folded into the batch b-major
(B*F, h, w, C) for every 2-D op; temporal resnets see (B, F, h, w, C); the spatio-temporal transformers
attend over the h*w tokens of one frame, then over the F frames of one pixel. Quirks reproduced on purpose:
GroupNorm eps 1e-6 in CrossAttnDown and all Up resnets but 1e-5 in DownBlock/mid resnets, temporal GroupNorm
pooled over frames, 'learned_with_images' blending, frame-index position embedding only on the temporal
branch, frame-0 CLIP context for the temporal cross-attention, skip concat [hidden, skip].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ..options import DEFAULT_OPTIONS, ModelOptions
from ..weights import DIFFUSERS_WEIGHTS, CheckpointError, PretrainedMixin, check_class_name, config_fields, sgm
from .layers import (
    AlphaBlender,
    Attention,
    Downsample2D,
    FeedForward,
    GroupNorm,
    LayerNorm,
    SpatioTemporalResBlock,
    TimestepEmbedding,
    Upsample2D,
    conv,
    dense,
    timestep_embedding,
)

Dtype = Any
DOWN_TYPES = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
UP_TYPES = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")


@flax.struct.dataclass
class UNetOutput:
    """sample: (B, F, h, w, out_channels), the model prediction (v for SVD); deep: with ``cache_branch``, the
    features (B*F, h', w', C') entering up block ``n - cache_branch`` (what a cached call reuses), else None."""

    sample: jax.Array
    deep: jax.Array | None = None


class BasicTransformerBlock(nn.Module):
    """Spatial block: self-attention over one frame's tokens, cross-attention, GEGLU FF (pre-LN, eps 1e-5).

    x (B*F, S, C), context (B*F, Sc, Dc) -> (B*F, S, C).
    """

    heads: int
    dim_head: int
    chunk_size: int | None = None
    chunk_dim: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, context):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        attn = lambda name: Attention(self.heads, self.dim_head, dtype=dt, param_dtype=pt, options=o, name=name)
        x = attn("attn1")(LayerNorm(1e-5, dt, pt, o.remats("layers"), name="norm1")(x)) + x
        x = attn("attn2")(LayerNorm(1e-5, dt, pt, o.remats("layers"), name="norm2")(x), context) + x
        ff = FeedForward(chunk_size=self.chunk_size, chunk_dim=self.chunk_dim, dtype=dt, param_dtype=pt, options=o,
                         name="ff")
        return ff(LayerNorm(1e-5, dt, pt, o.remats("layers"), name="norm3")(x)) + x


class TemporalBasicTransformerBlock(nn.Module):
    """Temporal block: each pixel's F frames are one sequence. x (B*F, S, C), context (B, S, Sc, Dc) -> (B*F, S, C).

    Works on (B, S, F, C) without merging B and S (diffusers' (B*S, F, C)): a token axis split over devices
    stays a separate axis. Forward chunking (diffusers always uses the frame axis here) slices ff_in/ff along F.
    """

    heads: int
    dim_head: int
    num_frames: int
    chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, context):
        dt, pt, o, f = self.dtype, self.param_dtype, self.options, self.num_frames
        bf, s, c = x.shape
        h = x.reshape(bf // f, f, s, c).transpose(0, 2, 1, 3)  # (B, S, F, C)
        ff = lambda name: FeedForward(chunk_size=self.chunk_size, chunk_dim=2, dtype=dt, param_dtype=pt, options=o,
                                      name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, dtype=dt, param_dtype=pt, options=o, name=name)
        h = ff("ff_in")(LayerNorm(1e-5, dt, pt, o.remats("layers"), name="norm_in")(h)) + h
        h = attn("attn1")(LayerNorm(1e-5, dt, pt, o.remats("layers"), name="norm1")(h)) + h
        h = attn("attn2")(LayerNorm(1e-5, dt, pt, o.remats("layers"), name="norm2")(h), context) + h
        h = ff("ff")(LayerNorm(1e-5, dt, pt, o.remats("layers"), name="norm3")(h)) + h
        return h.transpose(0, 2, 1, 3).reshape(bf, s, c)


class TransformerSpatioTemporalModel(nn.Module):
    """diffusers TransformerSpatioTemporalModel. x (B*F, h, w, C), ehs (B*F, Sc, Dc), indicator (B, F) -> same as x."""

    heads: int
    dim_head: int
    num_layers: int = 1
    chunk_size: int | None = None
    chunk_dim: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x, ehs, image_only_indicator):
        dt, pt, o = self.dtype, self.param_dtype, self.options
        b, f = image_only_indicator.shape
        bf, hh, ww, c = x.shape
        inner = self.heads * self.dim_head
        # Temporal cross-attention context: frame 0's encoder states, one copy per pixel: (B, h*w, Sc, Dc).
        ctx0 = ehs.reshape((b, f) + ehs.shape[1:])[:, 0]
        time_context = jnp.broadcast_to(ctx0[:, None], (b, hh * ww) + ctx0.shape[1:])
        residual = x
        h = GroupNorm(32, 1e-6, dt, pt, o.remats("layers"), name="norm")(x).reshape(bf, hh * ww, c)
        h = dense(inner, "proj_in", dt, pt)(h)
        frame_ids = jnp.tile(jnp.arange(f), b)
        emb = TimestepEmbedding(4 * c, c, dt, pt, name="time_pos_embed")(timestep_embedding(frame_ids, c).astype(dt))
        emb = emb[:, None, :]
        mixer = AlphaBlender(0.5, "learned_with_images", dtype=dt, param_dtype=pt, name="time_mixer")
        spatial, temporal = BasicTransformerBlock, TemporalBasicTransformerBlock
        if o.remats("transformers"):  # recomputed in the backward pass (same params)
            spatial, temporal = nn.remat(spatial), nn.remat(temporal)
        for i in range(self.num_layers):
            h = spatial(self.heads, self.dim_head, self.chunk_size, self.chunk_dim, dt, pt, o,
                                      name=f"transformer_blocks_{i}")(h, ehs)
            hm = temporal(self.heads, self.dim_head, f, self.chunk_size, dt, pt, o,
                                               name=f"temporal_transformer_blocks_{i}")(h + emb, time_context)
            h = mixer(h, hm, image_only_indicator)
        h = dense(c, "proj_out", dt, pt)(h)
        return h.reshape(bf, hh, ww, c) + residual


def _per_layer(value, n: int) -> list[int]:
    """An int, or one int per layer."""
    return [value] * n if isinstance(value, int) else list(value)


class _Block(nn.Module):
    """One down, mid or up block of the UNet (all five diffusers SpatioTemporal block types)."""

    kind: str
    out_channels: int
    num_layers: int
    transformer_layers: Sequence[int]
    heads: int
    resnet_eps: float
    add_sample: bool  # downsampler / upsampler
    chunk_size: int | None = None
    chunk_dim: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, h, temb, ehs, ind, skips=None, upsample_size=None):
        """upsample_size: (h, w) of the up-sampler's output, or None (twice the input); static under remat."""
        dt, pt, o, c = self.dtype, self.param_dtype, self.options, self.out_channels
        cross = self.kind.startswith("CrossAttn") or self.kind == "mid"
        outputs = []

        def attn(j, h):
            return TransformerSpatioTemporalModel(self.heads, c // self.heads, self.transformer_layers[j],
                                                  self.chunk_size, self.chunk_dim, dt, pt, o,
                                                  name=f"attentions_{j}")(h, ehs, ind)

        def resnet(j, h):
            return SpatioTemporalResBlock(c, self.resnet_eps, dtype=dt, param_dtype=pt, options=o,
                                          name=f"resnets_{j}")(h, temb, ind)

        if self.kind == "mid":
            h = resnet(0, h)
            for j in range(self.num_layers):
                h = resnet(j + 1, attn(j, h))
            return h
        for j in range(self.num_layers):
            if skips is not None:  # up block: concat [hidden, skip] on channels, skips popped from the end
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(j, h)
            if cross:
                h = attn(j, h)
            outputs.append(h)
        if self.add_sample and skips is None:
            h = Downsample2D(c, padding=1, dtype=dt, param_dtype=pt, options=o, name="downsamplers_0")(h)
            outputs.append(h)
        elif self.add_sample:
            h = Upsample2D(c, dt, pt, o, name="upsamplers_0")(h, upsample_size)
        return (h, outputs) if skips is None else h


class UNetSpatioTemporalConditionModel(PretrainedMixin, nn.Module):
    """The SVD UNet. Fields are diffusers' config keys (build from ``config.json`` with ``from_config``).

    Call: ``module.apply({"params": params}, sample, timestep, encoder_hidden_states, added_time_ids)``
      * sample (B, F, h, w, in_channels): [c_in-scaled noisy latents | image latents] for SVD;
      * timestep: scalar or (B,), the continuous 0.25*ln(sigma);
      * encoder_hidden_states (B, S, cross_attention_dim): the CLIP image embedding, S = 1 for SVD;
      * added_time_ids (B, n) with n * addition_time_embed_dim == projection_class_embeddings_input_dim
        ([fps - 1, motion_bucket_id, noise_aug_strength] for SVD).
    Returns :class:`UNetOutput` with sample (B, F, h, w, out_channels). h and w need not be equal nor divisible.

    ``forward_chunk_size`` / ``forward_chunk_dim``: diffusers' ``enable_forward_chunking`` (feed-forwards
    run over slices; dim 0 = frames x batch, 1 = tokens; temporal blocks always slice frames).
    ``options`` (:class:`~svd_jax.options.ModelOptions`): how it computes (attention backend, automatic
    feed-forward slicing, partitioner hooks); never changes the parameter tree.
    """

    sample_size: int | None = None
    in_channels: int = 8
    out_channels: int = 4
    down_block_types: Sequence[str] = ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
    up_block_types: Sequence[str] = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: int | Sequence[int] = 2
    cross_attention_dim: int | Sequence[int] = 1024
    transformer_layers_per_block: int | Sequence[Any] = 1
    num_attention_heads: int | Sequence[int] = (5, 10, 20, 20)
    num_frames: int = 25
    # GroupNorm eps of the resnets: None = diffusers' (1e-6 in the cross-attention down blocks and every up block,
    # 1e-5 elsewhere); a number = that everywhere (1e-5: Stability's original sgm model)
    resnet_eps: float | None = None
    forward_chunk_size: int | None = None
    forward_chunk_dim: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    _weights_names = (DIFFUSERS_WEIGHTS,)
    _sgm_prefixes = (sgm.UNET_PREFIX,)

    _sgm_rename = staticmethod(sgm.unet_sgm_name)
    _single_file_config = "SVD_XT_UNET"  # the svd_jax.configs entry from_single_file defaults to

    @classmethod
    def from_config(cls, config, dtype=jnp.float32, **fields):
        """Build from a diffusers ``unet/config.json`` dict; ``fields`` set other module fields (forward
        chunking, ``options``)."""
        check_class_name(config, "UNetSpatioTemporalConditionModel")
        kw = config_fields(cls, config)
        kw.update(fields)
        kw = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, tuple) else v)
              for k, v in kw.items()}
        module = cls(**kw, dtype=dtype, param_dtype=dtype)
        module.validate()
        return module

    def _levels(self):
        n = len(self.down_block_types)
        per = lambda v: [v] * n if isinstance(v, int) else list(v)
        return n, per(self.num_attention_heads), per(self.cross_attention_dim), per(self.layers_per_block), \
            per(self.transformer_layers_per_block)

    def validate(self):
        """Check the config values (the same checks diffusers makes, plus supported block types)."""
        n, heads, cross, layers, tlayers = self._levels()
        for name, vals, allowed in (("down_block_types", self.down_block_types, DOWN_TYPES),
                                    ("up_block_types", self.up_block_types, UP_TYPES)):
            bad = [t for t in vals if t not in allowed]
            if bad:
                raise CheckpointError(f"UNet {name} {bad} not supported; supported: {allowed}")
        for name, vals in (("up_block_types", self.up_block_types), ("block_out_channels", self.block_out_channels),
                           ("num_attention_heads", heads), ("cross_attention_dim", cross),
                           ("layers_per_block", layers), ("transformer_layers_per_block", tlayers)):
            if len(vals) != n:
                raise CheckpointError(f"UNet config: {name} has {len(vals)} entries but there are {n} down blocks")
        for c, h in zip(self.block_out_channels, heads):
            if c % h or c % 32:
                raise CheckpointError(f"UNet config: {c} channels must divide into {h} heads and 32 norm groups")
        if self.forward_chunk_dim not in (0, 1):
            raise ValueError(f"forward_chunk_dim must be 0 or 1, not {self.forward_chunk_dim}")
        if self.forward_chunk_size is not None and self.forward_chunk_size < 1:
            raise ValueError(f"forward_chunk_size must be a positive int or None, not {self.forward_chunk_size}")

    def _check_inputs(self, sample, timestep, ehs, added_time_ids):
        _, _, cross, _, _ = self._levels()
        if sample.ndim != 5 or sample.shape[-1] != self.in_channels:
            channels_first = sample.ndim == 5 and sample.shape[2] == self.in_channels
            hint = " (channels-first? use (B, F, h, w, C))" if channels_first else ""
            raise ValueError(f"UNet sample must be (B, F, h, w, {self.in_channels}); got {tuple(sample.shape)}{hint}")
        b = sample.shape[0]
        t = jnp.shape(timestep)
        if t not in ((), (1,), (b,)):
            raise ValueError(f"UNet timestep must be a scalar or ({b},); got shape {t}")
        if ehs.ndim != 3 or ehs.shape[0] != b or any(ehs.shape[-1] != d for d in set(cross)):
            raise ValueError(f"UNet encoder_hidden_states must be ({b}, S, {cross[0]}); got {tuple(ehs.shape)}")
        n_ids = self.projection_class_embeddings_input_dim // self.addition_time_embed_dim
        if added_time_ids.shape != (b, n_ids):
            raise ValueError(f"UNet added_time_ids must be ({b}, {n_ids}); got {tuple(added_time_ids.shape)}")

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, added_time_ids, cache_branch: int | None = None,
                 deep_features=None) -> UNetOutput:
        """The prediction for sample (B, F, h, w, in_channels), timestep () or (B,), encoder_hidden_states
        (B, 1, D), added_time_ids (B, 3).

        Step caching (DeepCache): with ``cache_branch`` b (1 <= b <= number of levels) the output also carries
        ``deep``, the features entering up block ``n - b`` (n levels); given those as ``deep_features`` (from an
        earlier call at another noise level), only the b shallowest down blocks and the b shallowest up blocks run
        (with the skips those down blocks make): the mid block and everything deeper are reused.
        """
        self._check_inputs(sample, timestep, encoder_hidden_states, added_time_ids)
        dt, pt, o = self.dtype, self.param_dtype, self.options
        n, heads, _, layers, tlayers = self._levels()
        b, f, hh, ww, _ = sample.shape
        ch0 = self.block_out_channels[0]
        temb_dim = 4 * ch0

        # 1-2. timestep + added-time embeddings (sinusoids in float32)
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timestep, jnp.float32), (-1,)), (b,))
        emb = TimestepEmbedding(temb_dim, dtype=dt, param_dtype=pt, name="time_embedding")(
            timestep_embedding(t, ch0).astype(dt))
        ids = timestep_embedding(added_time_ids.reshape(-1), self.addition_time_embed_dim).reshape(b, -1)
        emb = emb + TimestepEmbedding(temb_dim, dtype=dt, param_dtype=pt, name="add_embedding")(ids.astype(dt))

        # 3. fold frames into the batch, b-major
        x = sample.reshape((b * f, hh, ww, -1)).astype(dt)
        emb = jnp.repeat(emb, f, axis=0)
        ehs = jnp.repeat(encoder_hidden_states.astype(dt), f, axis=0)
        ind = jnp.zeros((b, f), dt)

        c = o.constrain_activations
        # remat="blocks": each block keeps only its inputs for the backward pass (argument 6, the up-sampler's
        # size, is static: it is a shape).
        block = nn.remat(_Block, static_argnums=(6,)) if o.remats("blocks") else _Block
        x = c(conv(ch0, (3, 3), "conv_in", dt, pt, o)(x))
        skips = [x]
        opts = dict(chunk_size=self.forward_chunk_size, chunk_dim=self.forward_chunk_dim, dtype=dt, param_dtype=pt,
                    options=o)
        if cache_branch is not None and not 1 <= cache_branch <= n:
            raise ValueError(f"cache_branch must be in 1..{n} (the UNet's levels); got {cache_branch}")
        cached = deep_features is not None
        if cached and cache_branch is None:
            raise ValueError("deep_features need the cache_branch they were made with")
        down = range(cache_branch) if cached else range(n)
        for i in down:
            kind = self.down_block_types[i]
            eps = 1e-6 if kind.startswith("CrossAttn") else 1e-5  # diffusers ignores the resnet_eps it passes
            eps = eps if self.resnet_eps is None else self.resnet_eps
            x, outs = block(kind, self.block_out_channels[i], layers[i], _per_layer(tlayers[i], layers[i]), heads[i],
                            eps, i < n - 1, **opts, name=f"down_blocks_{i}")(x, emb, ehs, ind, None, None)
            x = c(x)
            skips += [c(o) for o in outs]
        if cached:  # the shallow up blocks consume these skips; a last down-sampler output belongs to deeper ones
            skips = skips[:1 + sum(layers[j] + 1 for j in range(cache_branch)) - (1 if cache_branch < n else 0)]
        else:
            x = block("mid", self.block_out_channels[-1], 1, _per_layer(tlayers[-1], 1), heads[-1],
                      1e-5 if self.resnet_eps is None else self.resnet_eps, False,
                      **opts, name="mid_block")(x, emb, ehs, ind, None, None)
            x = c(x)

        # Up-samplers get the skip's size when the latent is not divisible by 2^(levels-1) (odd sizes).
        up_factor = 2 ** (n - 1)
        forward_size = hh % up_factor != 0 or ww % up_factor != 0
        rev = lambda v: list(reversed(v))
        r_ch, r_heads, r_layers, r_tl = rev(self.block_out_channels), rev(heads), rev(layers), rev(tlayers)
        deep = None
        first_up = n - cache_branch if cache_branch is not None else None
        if cached:
            x = deep_features.astype(dt)
        for i, kind in enumerate(self.up_block_types):
            nl = r_layers[i] + 1
            if i == first_up:
                deep = x
            if cached and i < first_up:
                continue
            block_skips = skips[-nl:]
            skips = skips[:-nl]
            size = skips[-1].shape[1:3] if (forward_size and i < n - 1) else None
            up_eps = 1e-6 if self.resnet_eps is None else self.resnet_eps
            x = block(kind, r_ch[i], nl, _per_layer(r_tl[i], nl), r_heads[i], up_eps, i < n - 1, **opts,
                      name=f"up_blocks_{i}")(x, emb, ehs, ind, block_skips, size)
            x = c(x)

        x = nn.silu(GroupNorm(32, 1e-5, dt, pt, o.remats("layers"), name="conv_norm_out")(x))
        x = conv(self.out_channels, (3, 3), "conv_out", dt, pt, o)(x)
        return UNetOutput(sample=x.reshape((b, f) + x.shape[1:]), deep=None if cached else deep)

    def init_params_abstract(self):
        """The parameter tree as ``jax.ShapeDtypeStruct``s (no compute, no memory)."""
        n = len(self.block_out_channels)
        s = 2 ** (n - 1)
        _, _, cross, _, _ = self._levels()
        n_ids = self.projection_class_embeddings_input_dim // self.addition_time_embed_dim
        args = (jax.ShapeDtypeStruct((1, 2, s, s, self.in_channels), self.dtype),
                jax.ShapeDtypeStruct((), jnp.float32),
                jax.ShapeDtypeStruct((1, 1, cross[0]), self.dtype),
                jax.ShapeDtypeStruct((1, n_ids), jnp.float32))
        return jax.eval_shape(lambda r, *a: self.init(r, *a)["params"], jax.random.PRNGKey(0), *args)
