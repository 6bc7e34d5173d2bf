"""Full-size SVD-XT image encoder and VAE: every tensor of the real architecture maps onto the Flax tree.

Built on torch's ``meta`` device (no weights, no download) and checked against
tests/data/svd_param_keys.txt; the Flax tree comes from ``jax.eval_shape``.
"""

import math

import torch

from svd_jax.configs import SVD_CLIP, SVD_VAE
from svd_jax.models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection
from svd_jax.weights import flatten_shapes, plan_conversion
from conftest import reference_keys


def _check(component, torch_model, flax_module, n_tensors, n_params):
    ref = reference_keys(component)
    assert len(ref) == n_tensors
    sd = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert sd == ref  # the diffusers/transformers architecture is the one the checklist describes
    target = flatten_shapes(flax_module.init_params_abstract())
    plan = plan_conversion(target, sd, ignore=type(flax_module)._ignore_keys)
    assert len(plan.entries) == n_tensors == len(target)
    assert sum(math.prod(s) for s in target.values()) == n_params


def test_full_size_vae_coverage():
    from diffusers import AutoencoderKLTemporalDecoder as TorchVAE

    with torch.device("meta"):
        model = TorchVAE(**SVD_VAE)
    _check("vae", model, AutoencoderKLTemporalDecoder.from_config(SVD_VAE), 374, 97_742_847)


def test_full_size_clip_coverage():
    from transformers import CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection as TorchCLIP

    with torch.device("meta"):
        model = TorchCLIP(CLIPVisionConfig(**SVD_CLIP))
    _check("image_encoder", model, CLIPVisionModelWithProjection.from_config(SVD_CLIP), 520, 632_076_800)
