"""CLIPVisionModelWithProjection: the SVD image encoder (OpenCLIP ViT-H/14 in transformers' layout), channels-last.

Mirrors transformers' ``CLIPVisionModelWithProjection`` : patch embedding (no bias), class token,
learned positions, pre-layernorm, pre-LN encoder layers, post-layernorm on the class token, bias-free
visual projection. The output is not L2-normalised.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ..options import DEFAULT_OPTIONS, ModelOptions
from ..weights import TRANSFORMERS_WEIGHTS, CheckpointError, PretrainedMixin, config_fields, sgm
from .attention import dot_product_attention
from .layers import Dense, LayerNorm, conv, dense, param

Dtype = Any


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> JAX functions (exact where transformers is exact).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": _quick_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@flax.struct.dataclass
class CLIPVisionOutput:
    """image_embeds (N, projection_dim), unnormalised; last_hidden_state (N, 1 + patches, hidden_size)."""

    image_embeds: jax.Array
    last_hidden_state: jax.Array


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN1(x)), then x + mlp(LN2(x)). x (N, S, hidden) -> same."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x):
        dt, pt = self.dtype, self.param_dtype
        h = LayerNorm(self.eps, dt, pt, name="layer_norm1")(x)
        h = CLIPAttention(self.hidden_size, self.num_heads, dt, pt, self.options, name="self_attn")(h)
        x = x + h
        h = LayerNorm(self.eps, dt, pt, name="layer_norm2")(x)
        h = CLIPMLP(self.intermediate_size, self.hidden_size, self.hidden_act, dt, pt, name="mlp")(h)
        return x + h


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections. x (N, S, hidden) -> same."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x):
        dt, pt = self.dtype, self.param_dtype
        d = self.hidden_size // self.num_heads
        split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, d))
        q = split(dense(self.hidden_size, "q_proj", dt, pt)(x))
        k = split(dense(self.hidden_size, "k_proj", dt, pt)(x))
        v = split(dense(self.hidden_size, "v_proj", dt, pt)(x))
        out = dot_product_attention(q, k, v, scale=d**-0.5, options=self.options)
        return dense(self.hidden_size, "out_proj", dt, pt)(out.reshape(x.shape[:2] + (self.hidden_size,)))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2. x (N, S, hidden) -> same."""

    intermediate_size: int
    hidden_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(self.intermediate_size, "fc1", self.dtype, self.param_dtype)(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return dense(self.hidden_size, "fc2", self.dtype, self.param_dtype)(h)


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + learned positions. (N, S, S, C) -> (N, 1 + (S/p)^2, hidden)."""

    hidden_size: int
    image_size: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, pixel_values):
        dt, pt = self.dtype, self.param_dtype
        p = self.patch_size
        cls_tok = param(self, "class_embedding", nn.initializers.normal(1.0), (self.hidden_size,), pt)
        patches = conv(self.hidden_size, (p, p), "patch_embedding", dt, pt, self.options, strides=(p, p),
                       padding=((0, 0), (0, 0)), use_bias=False)(pixel_values.astype(dt))
        n = pixel_values.shape[0]
        patches = patches.reshape(n, -1, self.hidden_size)  # row-major grid, as flatten(2) in PyTorch
        cls_tok = jnp.broadcast_to(cls_tok.astype(dt), (n, 1, self.hidden_size))
        x = jnp.concatenate([cls_tok, patches], axis=1)
        num_positions = (self.image_size // p) ** 2 + 1
        pos = nn.Embed(num_positions, self.hidden_size, dtype=dt, param_dtype=pt, name="position_embedding")
        return x + pos(jnp.arange(num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionTransformer: (N, S, S, C) -> (last_hidden_state, pooled (N, hidden))."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, pixel_values):
        dt, pt, o, eps = self.dtype, self.param_dtype, self.options, self.layer_norm_eps
        x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, dt, pt, o, name="embeddings")(
            pixel_values)
        x = LayerNorm(eps, dt, pt, name="pre_layrnorm")(x)  # sic: transformers' attribute name
        enc = _Encoder(self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
                       self.hidden_act, eps, dt, pt, o, name="encoder")
        x = enc(x)
        pooled = LayerNorm(eps, dt, pt, name="post_layernorm")(x[:, 0])
        return x, pooled


class _Encoder(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_attention_heads, self.hidden_act,
                                 self.eps, self.dtype, self.param_dtype, self.options, name=f"layers_{i}")(x)
        return x


class CLIPVisionModelWithProjection(PretrainedMixin, nn.Module):
    """The SVD image encoder. Fields are CLIPVisionConfig keys (build from ``config.json`` with ``from_config``).

    Call: ``module.apply({"params": params}, pixel_values)`` with pixel_values (N, image_size, image_size,
    num_channels), already CLIP-normalised -> :class:`CLIPVisionOutput` whose ``image_embeds`` is
    (N, projection_dim).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    options: ModelOptions = DEFAULT_OPTIONS

    _weights_names = (TRANSFORMERS_WEIGHTS,)
    _ignore_keys = (r"vision_model\.embeddings\.position_ids",)  # a buffer that older checkpoints saved
    _sgm_prefixes = (sgm.CLIP_PREFIX,)

    _sgm_rename = staticmethod(sgm.clip_sgm_name)
    _single_file_config = "SVD_CLIP"  # the svd_jax.configs entry from_single_file defaults to

    @classmethod
    def from_config(cls, config, dtype=jnp.float32, options: ModelOptions = DEFAULT_OPTIONS):
        """Build from a transformers CLIPVisionConfig dict (or a CLIPConfig dict with ``vision_config``)."""
        config = dict(config)
        if "vision_config" in config:  # a full CLIPConfig: projection_dim lives at the top
            top = config
            config = dict(top["vision_config"] or {})
            config.setdefault("projection_dim", top.get("projection_dim", cls.projection_dim))
        mt = config.get("model_type")
        if mt not in (None, "clip_vision_model", "clip"):
            raise CheckpointError(f"image encoder config has model_type {mt!r}; expected 'clip_vision_model'")
        module = cls(**config_fields(cls, config), dtype=dtype, param_dtype=dtype, options=options)
        module.validate()
        return module

    def validate(self):
        """Check the config values against what the architecture supports."""
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"CLIP hidden_act {self.hidden_act!r} not supported; "
                                  f"supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"CLIP hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise CheckpointError(f"CLIP image_size {self.image_size} is not a multiple of patch_size "
                                  f"{self.patch_size}")

    def setup(self):
        self.vision_model = CLIPVisionTransformer(
            self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
            self.image_size, self.patch_size, self.hidden_act, self.layer_norm_eps, self.dtype, self.param_dtype,
            self.options)
        self.visual_projection = Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                       param_dtype=self.param_dtype)

    def __call__(self, pixel_values) -> CLIPVisionOutput:
        """pixel_values (N, S, S, C), CLIP-normalised -> CLIPVisionOutput(image_embeds (N, projection_dim), ...)."""
        want = (self.image_size, self.image_size, self.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            hint = ""
            if pixel_values.ndim == 4 and pixel_values.shape[1] == self.num_channels:
                hint = " (channels-first? transpose to (N, H, W, C))"
            raise ValueError(f"CLIP expects pixel_values (N, {want[0]}, {want[1]}, {want[2]}); "
                             f"got {tuple(pixel_values.shape)}{hint}")
        hidden, pooled = self.vision_model(pixel_values)
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=hidden)

    def init_params_abstract(self):
        """The parameter tree as ``jax.ShapeDtypeStruct``s (no compute, no memory)."""
        x = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, self.num_channels), self.dtype)
        return jax.eval_shape(lambda r, x: self.init(r, x)["params"], jax.random.PRNGKey(0), x)
