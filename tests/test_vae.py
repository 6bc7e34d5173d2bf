"""Flax AutoencoderKLTemporalDecoder equals diffusers' on the same weights (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from svd_jax.models import AutoencoderKLTemporalDecoder
from conftest import VAE_CONFIGS, nchw, nhwc, rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_vaes):
    return {name: AutoencoderKLTemporalDecoder.from_pretrained(folder) for name, (_, folder) in tiny_vaes.items()}


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_encode_matches_diffusers(tiny_vaes, loaded, name):
    model, _ = tiny_vaes[name]
    module, params = loaded[name]
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)  # non-square
    post = module.apply({"params": params}, jnp.asarray(x), method="encode")
    with torch.no_grad():
        ref = model.encode(nchw(x)).latent_dist
    k = module.downscale
    assert post.mean.shape == (2, 32 // k, 48 // k, module.latent_channels)
    assert rel_err(post.mean, nhwc(ref.mean)) <= TOL
    assert rel_err(post.logvar, nhwc(ref.logvar)) <= TOL
    assert rel_err(post.mode(), nhwc(ref.mode())) <= TOL
    # sample() draws mean + std * eps: check it with the same eps
    rng = jax.random.PRNGKey(3)
    eps = np.asarray(jax.random.normal(rng, post.mean.shape))
    np.testing.assert_allclose(post.sample(rng), np.asarray(post.mean) + np.exp(0.5 * np.asarray(post.logvar)) * eps,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
@pytest.mark.parametrize("num_frames", [3, 1])
def test_decode_matches_diffusers(tiny_vaes, loaded, name, num_frames):
    model, _ = tiny_vaes[name]
    module, params = loaded[name]
    c = module.latent_channels
    z = np.random.default_rng(2).normal(size=(6, 5, 7, c)).astype(np.float32)  # 2 videos x 3 frames, odd sizes
    out = module.apply({"params": params}, jnp.asarray(z), num_frames=num_frames, method="decode")
    with torch.no_grad():
        ref = model.decode(nchw(z), num_frames=num_frames).sample
    assert out.shape == (6, 5 * module.downscale, 7 * module.downscale, 3)
    assert rel_err(out, nhwc(ref)) <= TOL


def test_decode_frames_of_a_video_interact(loaded):
    """The temporal layers really mix frames: changing frame 0 changes frame 1 of the same video only."""
    module, params = loaded["svd_like"]
    z = np.random.default_rng(5).normal(size=(4, 4, 4, 4)).astype(np.float32)
    z2 = z.copy()
    z2[0] += 1.0
    dec = lambda z: np.asarray(module.apply({"params": params}, jnp.asarray(z), num_frames=2, method="decode"))
    a, b = dec(z), dec(z2)
    assert np.abs(a[1] - b[1]).max() > 1e-3  # same video
    np.testing.assert_array_equal(a[2:], b[2:])  # the other video is untouched


def test_forward_matches_diffusers(tiny_vaes, loaded):
    model, _ = tiny_vaes["svd_like"]
    module, params = loaded["svd_like"]
    x = np.random.default_rng(4).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    out = module.apply({"params": params}, jnp.asarray(x), num_frames=2)
    with torch.no_grad():
        ref = model(nchw(x), num_frames=2).sample
    assert rel_err(out, nhwc(ref)) <= TOL


def test_jit(loaded):
    module, params = loaded["svd_like"]
    z = jnp.ones((2, 3, 3, 4))
    f = jax.jit(lambda p, z: module.apply({"params": p}, z, num_frames=2, method="decode"))
    np.testing.assert_allclose(f(params, z), module.apply({"params": params}, z, num_frames=2, method="decode"),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs(loaded):
    module, params = loaded["svd_like"]
    v = {"params": params}
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\).*channels-first"):
        module.apply(v, jnp.zeros((1, 3, 16, 16)), method="encode")
    with pytest.raises(ValueError, match="not a whole number of videos"):
        module.apply(v, jnp.zeros((5, 2, 2, 4)), num_frames=2, method="decode")
    with pytest.raises(ValueError, match="latents \\(N, h, w, 4\\)"):
        module.apply(v, jnp.zeros((2, 2, 2, 3)), num_frames=2, method="decode")
    with pytest.raises(ValueError, match="positive int"):
        module.apply(v, jnp.zeros((2, 2, 2, 4)), num_frames=0, method="decode")


@pytest.mark.parametrize("name,num_frames,frame_chunk,row_tile,slice_bytes", [
    ("svd_like", 3, 2, 4, None),    # 2 videos: frame chunks straddle videos, several row tiles at every level
    ("lpb3", 4, 1, 8, None),        # 3 resnets per up block; one frame at a time
    ("attn_lpb1", 2, 4, 16, None),  # 1-layer blocks; the whole batch in one chunk, one tile at the low levels
    ("svd_like", 5, None, None, 60_000),  # sizes from a byte budget: fewer, larger slices at the low levels
])
def test_streamed_decode_equals_decode(loaded, name, num_frames, frame_chunk, row_tile, slice_bytes):
    """decode_streamed (per-frame layers in frame chunks, temporal resnets in row tiles with their GroupNorm
    statistics summed over the tiles) equals the module's decode."""
    from svd_jax.models.vae import decode_streamed

    vae, params = loaded[name]
    z = np.random.default_rng(1).normal(size=(2 * num_frames, 8, 6, vae.latent_channels)).astype(np.float32)
    ref = vae.apply({"params": params}, z, num_frames=num_frames, method="decode")
    kw = {} if slice_bytes is None else dict(slice_bytes=slice_bytes)
    got = jax.jit(lambda p, z: decode_streamed(vae, p, z, num_frames, frame_chunk, row_tile, **kw))(params, z)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-5, rel_err(got, ref)
