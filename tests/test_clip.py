"""Flax CLIPVisionModelWithProjection equals transformers' on the same weights (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from svd_jax.models import CLIPVisionModelWithProjection
from conftest import CLIP_CONFIGS, nchw, rel_err

TOL = 1e-4


@pytest.mark.parametrize("name", list(CLIP_CONFIGS))
def test_embeddings_match_transformers(tiny_clips, name):
    model, folder = tiny_clips[name]
    module, params = CLIPVisionModelWithProjection.from_pretrained(folder)
    assert module.hidden_act == CLIP_CONFIGS[name]["hidden_act"]
    s = module.image_size
    x = np.random.default_rng(0).normal(size=(3, s, s, 3)).astype(np.float32)
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(x))
    with torch.no_grad():
        ref = model(pixel_values=nchw(x))
    assert out.image_embeds.shape == (3, CLIP_CONFIGS[name]["projection_dim"])
    assert rel_err(out.image_embeds, ref.image_embeds.numpy()) <= TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL


def test_activation_matters(tiny_clips):
    """gelu (erf) and quick_gelu give different embeddings: the config's activation is really used."""
    _, folder = tiny_clips["gelu"]
    module, params = CLIPVisionModelWithProjection.from_pretrained(folder)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 224, 224, 3)).astype(np.float32))
    a = module.apply({"params": params}, x).image_embeds
    b = module.clone(hidden_act="quick_gelu").apply({"params": params}, x).image_embeds
    assert float(jnp.abs(a - b).max()) > 1e-4


def test_bad_pixel_values(tiny_clips):
    _, folder = tiny_clips["gelu"]
    module, params = CLIPVisionModelWithProjection.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"\(N, 224, 224, 3\).*channels-first"):
        module.apply({"params": params}, jnp.zeros((1, 3, 224, 224)))
    with pytest.raises(ValueError, match=r"got \(1, 200, 200, 3\)"):
        module.apply({"params": params}, jnp.zeros((1, 200, 200, 3)))
