"""Attention backends: every path equals the plain formula; backend selection and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.models import attention as A
from svd_jax.options import ModelOptions


def _qkv(lead, sq, sk, h, d, dv=None, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=lead + (sq, h, d)).astype(np.float32) * 2  # peaked softmax: exercises the running max
    k = rng.normal(size=lead + (sk, h, d)).astype(np.float32) * 2
    v = rng.normal(size=lead + (sk, h, dv or d)).astype(np.float32)
    return q, k, v


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("lead,sq,sk,h,d,qb,kb", [
    ((2,), 100, 77, 3, 16, 32, 16),      # padded keys and queries, several blocks each
    ((2, 3), 64, 64, 2, 8, 16, 16),      # two leading batch dims, exact division
    ((1,), 9, 1000, 1, 512, 4, 128),     # the VAE's single 512-dim head
    ((3,), 37, 41, 2, 8, 7, 5),          # prime lengths
    ((2,), 5, 1, 2, 8, 2, 1),            # a single key
])
def test_blockwise_equals_plain(lead, sq, sk, h, d, qb, kb):
    q, k, v = _qkv(lead, sq, sk, h, d)
    ref = A.dot_product_attention(q, k, v, implementation="xla")
    got = jax.jit(lambda q, k, v: A.blockwise_attention(q, k, v, scale=d ** -0.5, q_block=qb, k_block=kb))(q, k, v)
    assert got.shape == ref.shape
    assert _rel(got, ref) <= 1e-5


def test_blockwise_gradients_equal_plain_and_need_no_score_matrix():
    """d(loss)/d(q, k, v) of the blockwise path equal the plain formula's (padded blocks included), and under
    differentiation the compiled program's temporaries stay far below one float32 score matrix: tiles are
    recomputed in the backward pass instead of kept."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 50, 2, 8)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.normal(size=(2, 50, 2, 8)), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))
    xla = lambda *a: A.dot_product_attention(*a, scale=0.3, implementation="xla")
    plain = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    block = jax.grad(loss(lambda *a: A.blockwise_attention(*a, scale=0.3, q_block=16, k_block=12)),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(plain, block):
        assert _rel(b, a) <= 1e-5

    big = jax.ShapeDtypeStruct((1, 4096, 1, 64), jnp.float32)
    scores = 4096 * 4096 * 4
    w = jnp.zeros((1, 4096, 1, 64), jnp.float32)
    f = jax.grad(loss(lambda *a: A.blockwise_attention(*a, scale=0.1, q_block=256, k_block=256)), argnums=(0, 1, 2))
    temp = jax.jit(f).lower(big, big, big).compile().memory_analysis().temp_size_in_bytes
    assert temp < scores / 4, (temp, scores)


def test_backend_selection_and_errors():
    q, k, v = _qkv((1,), 64, 64, 2, 8)
    assert A.resolve_implementation(q, k, v) == "xla"  # small: the plain path
    tight = ModelOptions(attention_auto_bytes=64 * 64 * 2 * 4 - 1)
    assert A.resolve_implementation(q, k, v, tight) == "blockwise"  # scores above the budget
    xla = tight.replace(attention="xla")
    assert A.resolve_implementation(q, k, v, xla) == "xla"
    assert A.resolve_implementation(q, k, v, xla, "blockwise") == "blockwise"  # the argument wins
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*choose one of"):
        A.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelOptions(attention="nope")
    if jax.default_backend() != "gpu":  # never silently selected where it cannot run
        assert A.resolve_implementation(q.astype(jnp.bfloat16), k, v) != "cudnn"
        with pytest.raises(ValueError, match="cudnn attention backend needs a GPU"):
            A.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="do not match"):
        A.dot_product_attention(q, k[:, :, :1], v)


def test_pipeline_blockwise_equals_xla(tiny_pipeline):
    """The whole generation with every attention (CLIP, VAE, UNet spatial/temporal) blockwise, in blocks small
    enough that each call runs several, equals the plain backend; the backend is part of the jit cache key."""
    small_blocks = ModelOptions(attention_q_block=8, attention_k_block=4)
    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline[1], attention="xla", options=small_blocks)
    assert pipe.options == small_blocks.replace(attention="xla")
    img = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    kw = dict(height=64, width=48, num_frames=3, num_inference_steps=2, decode_chunk_size=2, seed=0, output_type="np")
    ref = pipe(img, **kw).frames
    pipe.attention = "blockwise"
    got = pipe(img, **kw).frames
    assert pipe.trace_count == 2  # recompiled for the new backend
    assert np.abs(got - ref).max() <= 1e-4
    with pytest.raises(ValueError, match="attention must be one of"):
        StableVideoDiffusionPipeline(pipe.unet, pipe.vae, pipe.image_encoder, pipe.scheduler, pipe.params,
                                     attention="fast")


@pytest.mark.parametrize("lead,sq,sk,h,d", [
    ((2,), 256, 256, 2, 64),      # multiples of 128: no padding
    ((1, 2), 100, 77, 3, 16),     # queries and keys padded, masked by segment ids; two leading dims
    ((1,), 144, 300, 1, 512),     # the VAE's single 512-dim head (smaller tiles), padded keys
])
def test_pallas_tpu_kernel_equals_plain(lead, sq, sk, h, d):
    """The TPU flash-attention kernel, run in Pallas' TPU interpreter on this backend."""
    q, k, v = _qkv(lead, sq, sk, h, d, seed=1)
    ref = A.dot_product_attention(q, k, v, implementation="xla")
    got = A.pallas_attention(q, k, v, scale=d ** -0.5, interpret=True)
    assert got.shape == ref.shape
    assert _rel(got, ref) <= 1e-5


def test_pallas_selection():
    q, k, v = _qkv((1,), 256, 256, 2, 64)
    opts = ModelOptions(attention_auto_bytes=1024)
    if jax.default_backend() != "tpu":  # never silently selected where it cannot run
        assert A.resolve_implementation(q, k, v, opts) == "blockwise"
        with pytest.raises(ValueError, match="pallas attention backend needs a TPU"):
            A.dot_product_attention(q, k, v, options=opts, implementation="pallas")
    tpu = opts.replace(platform="tpu")  # how auto decides on a TPU
    assert A.resolve_implementation(q, k, v, tpu) == "pallas"
    # a partitioned program: XLA cannot split a Pallas call
    assert A.resolve_implementation(q, k, v, tpu.replace(partitioned=True)) == "blockwise"
    assert A.resolve_implementation(q, k, v[..., :32], tpu) == "blockwise"  # unequal head dims
