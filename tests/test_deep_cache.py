"""Step caching (DeepCache-style; svd_jax/models/unet.py cache_branch / deep_features, svd_jax/pipeline/stages.py):
a cached UNet pass on its own deep features equals the full pass, interval 1 is the exact generation, the stepwise
programs carry the cache like the one-program generation, bad settings are refused."""

import jax
import numpy as np
import pytest
from test_pipeline import F, H, W, _image
from test_unet import TINY, _inputs

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.models import UNetSpatioTemporalConditionModel
from conftest import rel_err


@pytest.mark.parametrize("branch", [1, 2, 3])
def test_cached_pass_on_its_own_features_equals_the_full_pass(branch):
    """Odd latent sizes (7 x 10: forwarded up-sampler sizes) and all three branches of a 3-level UNet."""
    unet = UNetSpatioTemporalConditionModel.from_config(TINY)
    x, ehs, ids = _inputs(0, 2, 3, 7, 10, 1)
    params = unet.init(jax.random.PRNGKey(0), x, 0.3, ehs, ids)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * np.random.default_rng(1).standard_normal(p.shape).astype(p.dtype),
                          params)  # no zero-initialised output convolution hiding a branch
    apply = jax.jit(lambda p, d, **kw: unet.apply({"params": p}, x, 0.3, ehs, ids, **kw),
                    static_argnames=("cache_branch",))
    plain = apply(params, None).sample
    full = apply(params, None, cache_branch=branch)
    assert full.deep is not None and full.deep.shape[0] == 2 * 3
    np.testing.assert_array_equal(np.asarray(full.sample), np.asarray(plain))
    cached = apply(params, full.deep, cache_branch=branch, deep_features=full.deep)
    assert cached.deep is None
    assert rel_err(cached.sample, plain) <= 1e-6
    stale = apply(params, full.deep, cache_branch=branch, deep_features=full.deep * 1.5)
    assert rel_err(stale.sample, plain) > 1e-3  # the cached features are really used
    with pytest.raises(ValueError, match="cache_branch must be in 1..3"):
        unet.apply({"params": params}, x, 0.3, ehs, ids, cache_branch=4)


def test_generation_with_step_caching(tiny_pipeline):
    _, folder = tiny_pipeline
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    image = _image()
    kw = dict(height=H, width=W, num_frames=F, seed=5, num_inference_steps=4, output_type="np")
    exact = pipe(image, **kw).frames
    np.testing.assert_array_equal(pipe(image, cache_interval=1, **kw).frames, exact)  # every step whole
    cached = pipe(image, cache_interval=2, **kw).frames
    diff = float(np.abs(cached - exact).max())
    print(f"tiny checkpoint, 4 Euler steps, interval 2, branch 1: max abs frame difference vs exact {diff:.3f}")
    assert diff > 1e-4 and np.isfinite(cached).all()
    stepwise = pipe(image, cache_interval=2, progress=True, **kw).frames
    assert rel_err(stepwise, cached) <= 1e-6
    with pytest.raises(ValueError, match="cache_interval must be a positive integer"):
        pipe(image, cache_interval=0, **kw)
    with pytest.raises(ValueError, match=r"cache_branch must be in 1..2"):
        pipe(image, cache_interval=2, cache_branch=3, **kw)
