"""svd_jax.training.denoising_loss equals the EDM v-objective computed with diffusers' UNet in torch: the loss and
its gradient with respect to every UNet parameter (torch autograd), fp32, on perturbed tiny weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svd_jax.training import denoising_loss
from svd_jax.weights import params_to_torch_state
from conftest import TINY_PIPE_UNET, make_unet_pair, rel_err, torch_edm_loss

B, F, H, W = 2, 3, 4, 6


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    return make_unet_pair(TINY_PIPE_UNET, tmp_path_factory.mktemp("unet"), perturb_seed=7)


def _batch(seed, d):
    rng = np.random.default_rng(seed)
    return dict(x0=rng.normal(size=(B, F, H, W, 4)).astype(np.float32),
                image_latents=rng.normal(size=(B, H, W, 4)).astype(np.float32),
                image_embeds=rng.normal(size=(B, 1, d)).astype(np.float32),
                added_time_ids=np.array([[6, 127, 0.02], [3, 30, 0.3]], np.float32),
                sigma=np.array([0.4, 7.5], np.float32),
                noise=rng.normal(size=(B, F, H, W, 4)).astype(np.float32))


def test_loss_and_gradients_equal_torch(unets):
    model, module, params = unets
    batch = _batch(0, TINY_PIPE_UNET["cross_attention_dim"])
    model.zero_grad()
    ref = torch_edm_loss(model, **batch)
    ref.backward()
    ref_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}

    loss, grads = jax.jit(jax.value_and_grad(lambda p: denoising_loss(module, p, **batch)))(params)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert rel_err(loss, ref.detach().numpy()) <= 1e-5, (float(loss), float(ref))
    got = params_to_torch_state(jax.device_get(grads))
    assert set(got) == set(ref_grads)
    # Tensors whose gradient is zero in exact arithmetic (a per-channel constant right before a GroupNorm of one
    # channel per group, which removes it) come out as float32 noise ~1e-8 of the largest gradient in both
    # frameworks: they must stay that small; every other tensor must match.
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    zero = [k for k, g in ref_grads.items() if np.abs(g).max() <= 1e-6 * scale]
    live = [k for k in ref_grads if k not in zero]
    assert len(live) > 300, len(live)  # nearly every parameter gets a real gradient
    assert all(np.abs(got[k]).max() <= 1e-6 * scale for k in zero), zero
    worst = max((rel_err(got[k], ref_grads[k]), k) for k in live)
    assert worst[0] <= 1e-4, worst


def test_loss_weighting_and_bad_shapes(unets):
    """Per-clip sigmas act per clip (the loss of a batch is the mean of its clips' losses), and wrong shapes are
    refused with the expected ones."""
    _, module, params = unets
    batch = _batch(1, TINY_PIPE_UNET["cross_attention_dim"])
    loss = jax.jit(lambda p, b: denoising_loss(module, p, **b))  # one compile per batch size
    both = loss(params, batch)
    one = [loss(params, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(B)]
    assert rel_err(both, np.mean(one)) <= 1e-5
    with pytest.raises(ValueError, match=r"sigma must be \(2,\)"):
        denoising_loss(module, params, **{**batch, "sigma": np.float32(1.0)})
    with pytest.raises(ValueError, match="image_latents must be"):
        denoising_loss(module, params, **{**batch, "image_latents": batch["image_latents"][:, :2]})
