"""svd_jax.preprocessing against diffusers' own preprocessing code (torch oracle, CPU, float32)."""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipeline,
    _resize_with_antialiasing,
)
from diffusers.video_processor import VideoProcessor

from svd_jax import preprocessing as pp

RESIZE_SIZES = [(576, 1024), (300, 500), (100, 150), (224, 224), (231, 97), (600, 240), (1024, 576), (2, 3),
                (7, 400)]


def rel_err(a, b) -> float:
    """max|a - b| / max|b|, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_uint8(h, w, c, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def random_pil(h, w, mode="RGB", seed=0) -> PIL.Image.Image:
    if mode == "L":
        return PIL.Image.fromarray(random_uint8(h, w, 1, seed)[..., 0], mode="L")
    if mode == "RGBA":
        return PIL.Image.fromarray(random_uint8(h, w, 4, seed), mode="RGBA")
    if mode == "P":
        return PIL.Image.fromarray(random_uint8(h, w, 3, seed), mode="RGB").quantize(colors=64)
    return PIL.Image.fromarray(random_uint8(h, w, 3, seed), mode="RGB")


def clip_feature_extractor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor()  # OpenAI CLIP mean/std, as SVD's feature_extractor


def diffusers_clip_branch(pil_images, size=(224, 224)) -> np.ndarray:
    """The maths of `_encode_image` for PIL input, step by step with diffusers' functions -> (N, 3, 224, 224)
    (diffusers' hard-coded size; another ``size`` in its place for a smaller image encoder)."""
    vp = VideoProcessor(do_resize=True, vae_scale_factor=8)
    x = vp.numpy_to_pt(vp.pil_to_numpy(pil_images))
    x = x * 2.0 - 1.0
    x = _resize_with_antialiasing(x, size)
    x = (x + 1.0) / 2.0
    out = clip_feature_extractor()(images=x, do_normalize=True, do_center_crop=False, do_resize=False,
                                   do_rescale=False, return_tensors="pt").pixel_values
    return out.numpy()


# ---------------------------------------------------------------------------------------------------------------
# anti-aliased resize matrices
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", RESIZE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_resize_matrices_match_diffusers(size):
    h, w = size
    x = np.random.default_rng(h * 7919 + w).random((2, 3, h, w)).astype(np.float32) * 2.0 - 1.0
    mh, mw = pp.clip_resize_matrices(h, w)
    assert mh.shape == (224, h) and mw.shape == (224, w) and mh.dtype == np.float64
    ours = np.einsum("oh,nchw->ncow", mh, x.astype(np.float64))
    ours = np.einsum("ncow,pw->ncop", ours, mw)
    ref = _resize_with_antialiasing(torch.from_numpy(x), (224, 224)).numpy()
    err = rel_err(ours, ref)
    print(f"resize {h}x{w}: rel err {err:.3e}")
    assert err <= 1e-5


def test_resize_matrices_other_output_size_and_cache():
    x = np.random.default_rng(1).random((1, 3, 90, 130)).astype(np.float32) * 2.0 - 1.0
    mh, mw = pp.clip_resize_matrices(90, 130, 37, 61)
    ours = np.einsum("oh,nchw,pw->ncop", mh, x.astype(np.float64), mw, optimize=True)
    ref = _resize_with_antialiasing(torch.from_numpy(x), (37, 61)).numpy()
    assert rel_err(ours, ref) <= 1e-5
    assert pp.clip_resize_matrices(90, 130, 37, 61)[0] is mh  # lru_cache
    # rows sum to one (blur and bicubic weights each do), so a constant image stays constant
    np.testing.assert_allclose(mh.sum(1), 1.0, atol=1e-12)


def test_known_kernels_576x1024():
    """The anti-alias blur taps for 576x1024 -> 224x224 (interior rows of the blur matrix): sigma = (576/224 - 1)/2
    ~ 0.79 with 3 taps along H, sigma = (1024/224 - 1)/2 ~ 1.79 with 7 taps along W."""
    taps = pp._gaussian_taps(3, (576 / 224 - 1) / 2)
    np.testing.assert_allclose(taps, [0.235420, 0.529159, 0.235420], atol=2e-6)
    taps = pp._gaussian_taps(7, (1024 / 224 - 1) / 2)
    np.testing.assert_allclose(taps, [0.057166, 0.125207, 0.200410, 0.234432, 0.200410, 0.125207, 0.057166],
                               atol=2e-6)


@pytest.mark.parametrize("size", [(1, 5), (5, 1), (1, 1)])
def test_one_pixel_axis_raises_like_torch(size):
    with pytest.raises(RuntimeError):  # torch's reflect pad refuses it
        _resize_with_antialiasing(torch.zeros(1, 3, *size), (224, 224))
    with pytest.raises(ValueError, match="reflect padding"):
        pp.clip_resize_matrices(*size)


# ---------------------------------------------------------------------------------------------------------------
# CLIP branch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(576, 1024), (100, 150), (231, 97)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_clip_preprocess_matches_diffusers(size):
    images = [random_pil(*size, seed=3), random_pil(*size, seed=4)]
    ref = diffusers_clip_branch(images)
    x = np.stack([pp.pil_to_float(im) for im in images])
    ours = np.asarray(pp.clip_preprocess(x))
    assert ours.shape == (2, 224, 224, 3) and ours.dtype == np.float32
    err = rel_err(ours.transpose(0, 3, 1, 2), ref)
    print(f"clip_preprocess {size}: rel err {err:.3e}")
    assert err <= 1e-5
    jitted = np.asarray(jax.jit(pp.clip_preprocess)(jnp.asarray(x)))
    assert rel_err(jitted, ours) <= 1e-6


@pytest.mark.parametrize("size", [30, (30, 40)], ids=str)
def test_clip_preprocess_other_size(size):
    """``size`` (the image encoder's image_size) in place of diffusers' hard-coded 224; 224 stays the default."""
    images = [random_pil(100, 150, seed=6)]
    out_hw = (size, size) if isinstance(size, int) else size
    x = np.stack([pp.pil_to_float(im) for im in images])
    ours = np.asarray(pp.clip_preprocess(x, size=size))
    assert ours.shape == (1, *out_hw, 3)
    assert rel_err(ours.transpose(0, 3, 1, 2), diffusers_clip_branch(images, out_hw)) <= 1e-5
    np.testing.assert_array_equal(np.asarray(pp.clip_preprocess(x, size=224)), np.asarray(pp.clip_preprocess(x)))


def test_clip_preprocess_matches_pipeline_encode_image():
    """Run diffusers' real `_encode_image` with an identity "encoder" that hands back the pixel values it got."""

    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))  # `_encode_image` reads the dtype off the parameters

        def forward(self, pixel_values):
            return types.SimpleNamespace(image_embeds=pixel_values.flatten(1))  # (B, 3*224*224) "embedding"

    fake = types.SimpleNamespace(image_encoder=Identity(), video_processor=VideoProcessor(vae_scale_factor=8),
                                 feature_extractor=clip_feature_extractor())
    image = random_pil(576, 1024, seed=11)
    with torch.no_grad():
        ref = StableVideoDiffusionPipeline._encode_image(fake, image, "cpu", 1, False)
    ref = ref.reshape(1, 3, 224, 224).numpy()
    ours = np.asarray(pp.clip_preprocess(pp.pil_to_float(image)[None]))
    err = rel_err(ours.transpose(0, 3, 1, 2), ref)
    print(f"_encode_image 576x1024: rel err {err:.3e}")
    assert err <= 1e-5


def test_pil_to_float_matches_pil_to_numpy():
    image = random_pil(37, 53, seed=5)
    ref = VideoProcessor.pil_to_numpy(image)[0]
    ours = pp.pil_to_float(image)
    assert ours.dtype == np.float32 and ours.shape == (37, 53, 3)
    np.testing.assert_array_equal(ours, ref)


# ---------------------------------------------------------------------------------------------------------------
# VAE branch
# ---------------------------------------------------------------------------------------------------------------

VAE_CASES = [  # (input h, w), (target height, width)
    ((576, 1024), (576, 1024)),  # already the right size: no resampling
    ((600, 1000), (576, 1024)),
    ((300, 500), (576, 1024)),  # upsampling
    ((1080, 1920), (576, 1024)),
    ((123, 77), (300, 500)),  # target not a multiple of 8 -> 296 x 496
    ((64, 64), (63, 65)),  # -> 56 x 64
]


@pytest.mark.parametrize("case", VAE_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}->{c[1][0]}x{c[1][1]}")
def test_vae_preprocess_matches_diffusers(case):
    (h0, w0), (h, w) = case
    image = random_pil(h0, w0, seed=h0 + w0)
    ref = VideoProcessor(do_resize=True, vae_scale_factor=8).preprocess(image, height=h, width=w)
    ref = ref[0].permute(1, 2, 0).numpy()
    ours = pp.vae_preprocess_pil(image, h, w)
    assert ours.dtype == np.float32 and ours.shape == (h - h % 8, w - w % 8, 3)
    assert ref.shape == ours.shape
    np.testing.assert_array_equal(ours, ref)  # bit-exact
    assert ours.min() >= -1.0 and ours.max() <= 1.0


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_vae_preprocess_non_rgb(mode):
    image = random_pil(150, 210, mode=mode, seed=21)
    # diffusers' SVD VideoProcessor does not convert: the channel count leaks through (4 for RGBA, 1 for L) and the
    # VAE would fail on it. The documented path converts with load_image (= convert("RGB")) first; match that.
    raw = VideoProcessor(do_resize=True, vae_scale_factor=8).preprocess(image, height=144, width=200)
    assert raw.shape[1] == {"RGBA": 4, "L": 1, "P": 1}[mode]
    ref = VideoProcessor(do_resize=True, vae_scale_factor=8).preprocess(image.convert("RGB"), height=144, width=200)
    ours = pp.vae_preprocess_pil(image, 144, 200)
    np.testing.assert_array_equal(ours, ref[0].permute(1, 2, 0).numpy())
    # the CLIP branch gets the same RGB image
    np.testing.assert_array_equal(pp.pil_to_float(image), VideoProcessor.pil_to_numpy(image.convert("RGB"))[0])
    if mode == "L":
        # for grey input, diffusers' own do_convert_rgb=True (convert after resize) agrees too
        ref2 = VideoProcessor(vae_scale_factor=8, do_convert_rgb=True).preprocess(image, height=144, width=200)
        np.testing.assert_array_equal(ours, ref2[0].permute(1, 2, 0).numpy())


def test_to_rgb():
    rgb = random_pil(5, 6, seed=1)
    assert pp.to_rgb(rgb) is rgb
    for mode in ("RGBA", "L", "P"):
        out = pp.to_rgb(random_pil(5, 6, mode=mode, seed=2))
        assert out.mode == "RGB" and out.size == (6, 5)
