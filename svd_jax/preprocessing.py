"""Image preprocessing of the SVD pipeline, equal to diffusers (no torch).

Two branches of diffusers' ``StableVideoDiffusionPipeline`` take the user's conditioning image:

* CLIP branch (``StableVideoDiffusionPipeline._encode_image``): the image at its *original* resolution,
  in [-1, 1], goes through kornia-style anti-aliased resize to 224x224 (Gaussian blur + bicubic,
  ``align_corners=True``), back to [0, 1], then OpenAI-CLIP mean/std normalisation. Here the blur and the
  bicubic resize are linear per axis, so they are folded into two dense matrices (``clip_resize_matrices``)
  and applied as ``Mh @ X @ Mw^T``. diffusers hard-codes 224, SVD's image encoder's ``image_size``; the
  pipeline here resizes to its encoder's ``image_size`` (the only size a CLIP without position interpolation
  takes), so SVD's is unchanged and smaller CLIP configs work.
* VAE branch (``video_processor.preprocess(image, height, width)``): PIL LANCZOS resize to (height, width)
  (rounded down to multiples of 8), /255, then ``2x - 1``.

Layout here is channels-last (N, H, W, C) throughout; diffusers is NCHW.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VAE_SCALE_FACTOR",
    "clip_preprocess",
    "clip_resize_matrices",
    "pil_to_float",
    "to_rgb",
    "vae_preprocess_pil",
]

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the defaults of CLIPImageProcessor and SVD's feature_extractor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# diffusers' `_encode_image` resize target (hard-coded), SVD's image encoder's image_size; the default of
# clip_preprocess only: the pipeline passes its encoder's image_size.
CLIP_SIZE = 224
# 2 ** (len(vae.block_out_channels) - 1) for the SVD VAE.
VAE_SCALE_FACTOR = 8
# PyTorch's bicubic constant (jax.image / PIL use -0.5).
_CUBIC_A = -0.75


# ----------------------------------------------------------------------------------------------------------------
# CLIP branch: anti-aliased resize folded into matrices
# ----------------------------------------------------------------------------------------------------------------


def _gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
    """diffusers `_gaussian`: taps at -(k//2)..k//2 (+0.5 for even k), exp(-d^2 / 2 sigma^2), sum 1."""
    d = np.arange(ksize, dtype=np.float64) - ksize // 2
    if ksize % 2 == 0:  # dead in practice (kernel sizes are forced odd) but kept to mirror diffusers
        d = d + 0.5
    g = np.exp(-(d**2) / (2.0 * sigma**2))
    return g / g.sum()


def _blur_matrix(n: int, ksize: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of the 1-D reflect-padded "valid" correlation that diffusers' `_filter2d` runs on one axis."""
    # `_compute_padding`: front = (k-1)//2, rear = (k-1) - front.
    pad_front = (ksize - 1) // 2
    pad_rear = (ksize - 1) - pad_front
    # torch's reflect pad refuses a pad >= the dimension (it would need a second reflection); do the same rather
    # than invent an answer. In practice this only happens for an image 1 pixel high or wide.
    if pad_front >= n or pad_rear >= n:
        raise ValueError(
            f"anti-aliased resize: reflect padding ({pad_front}, {pad_rear}) must be smaller than the image size {n} "
            "along that axis (torch.nn.functional.pad(mode='reflect') raises here too); the image is too small"
        )
    taps = _gaussian_taps(ksize, sigma)
    mat = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(ksize):
            q = i + j - pad_front  # index into the unpadded signal
            # reflect without repeating the edge pixel: -1 -> 1, n -> n-2
            if q < 0:
                q = -q
            elif q > n - 1:
                q = 2 * (n - 1) - q
            mat[i, q] += taps[j]
    return mat


def _cubic_weight(d: float) -> float:
    """Keys cubic-convolution kernel with PyTorch's A = -0.75."""
    a = _CUBIC_A
    d = abs(d)
    if d <= 1.0:
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    if d < 2.0:
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch `F.interpolate(mode="bicubic", align_corners=True)` along one axis."""
    # align_corners=True: s = o * (in-1)/(out-1); torch uses scale 0 when out == 1. Torch computes the scale and
    # the source coordinate in float32 (opmath of a float32 tensor); rounding s to float32 moves t by up to
    # ~ulp(in) (3e-5 at in=1024), which changes the output by ~4e-5, so reproduce that rounding exactly.
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    mat = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        s = float(np.float32(scale) * np.float32(o))
        # torch `guard_index_and_lambda`: index capped at in-1, fraction clamped to [0, 1].
        i0 = min(int(math.floor(s)), n_in - 1)
        t = min(max(s - i0, 0.0), 1.0)
        weights = (_cubic_weight(t + 1.0), _cubic_weight(t), _cubic_weight(1.0 - t), _cubic_weight(2.0 - t))
        for k, w in enumerate(weights):
            idx = min(max(i0 - 1 + k, 0), n_in - 1)  # border indices are clamped (replicate), not reflected
            mat[o, idx] += w
    return mat


def _axis_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): diffusers' Gaussian anti-alias blur followed by bicubic resize, along one axis."""
    factor = n_in / n_out
    # skimage's sigma; 0.001 (an identity blur) when upsampling.
    sigma = max((factor - 1.0) / 2.0, 0.001)
    # "2 sigma each side, at least 3", truncated by int(), then forced odd.
    ksize = int(max(2.0 * 2 * sigma, 3))
    if ksize % 2 == 0:
        ksize += 1
    return _bicubic_matrix(n_in, n_out) @ _blur_matrix(n_in, ksize, sigma)


@functools.lru_cache(maxsize=32)
def clip_resize_matrices(in_h: int, in_w: int, out_h: int = CLIP_SIZE, out_w: int = CLIP_SIZE):
    """Per-axis matrices of diffusers' `_resize_with_antialiasing(x, (out_h, out_w))`.

    Folds the Gaussian blur (kernel size, sigma, reflect padding as diffusers/kornia) and the torch bicubic
    resize (align_corners=True, A=-0.75, clamped borders, no output clamp) into one linear map per axis, so that
    for every image channel X of shape (in_h, in_w): ``resized = Mh @ X @ Mw.T`` (shape (out_h, out_w)).
    Blurring along W first then H (diffusers' order) is the same linear map, since the two act on different axes.

    Args:
        in_h, in_w: input image size in pixels (each >= 2; torch's reflect pad fails on a 1-pixel axis).
        out_h, out_w: output size (the image encoder's image_size; 224x224 for SVD's CLIP).

    Returns:
        (Mh, Mw): float64 numpy arrays of shape (out_h, in_h) and (out_w, in_w). Cached; treat as read-only.

    Raises:
        ValueError: when the reflect padding does not fit in the image (torch raises a RuntimeError there).
    """
    in_h, in_w, out_h, out_w = int(in_h), int(in_w), int(out_h), int(out_w)
    if min(in_h, in_w, out_h, out_w) < 1:
        raise ValueError(f"sizes must be positive, got in=({in_h}, {in_w}) out=({out_h}, {out_w})")
    mh = _axis_matrix(in_h, out_h)
    mw = _axis_matrix(in_w, out_w)
    mh.setflags(write=False)  # shared through the cache
    mw.setflags(write=False)
    return mh, mw


def clip_preprocess(images, mean=CLIP_MEAN, std=CLIP_STD, size: int | tuple[int, int] = CLIP_SIZE) -> jnp.ndarray:
    """CLIP-branch preprocessing of diffusers' `_encode_image` for PIL input, channels-last.

    Steps (diffusers maths): x*2-1; anti-aliased resize to ``size`` (224x224 in diffusers; aspect ratio
    squashed, not kept); (x+1)/2; (x - CLIP_MEAN) / CLIP_STD. No clipping anywhere. Pure jnp for static shapes,
    so jit-able.

    Args:
        images: float array (N, H, W, 3) in [0, 1] (numpy or jax), e.g. ``pil_to_float(img)[None]``, the image at
            its original resolution. H, W >= 2.
        mean, std: per-channel normalisation (the feature extractor's image_mean / image_std).
        size: the output size, an int (square) or (height, width): the image encoder's ``image_size``
            (224, diffusers' hard-coded value, for SVD).

    Returns:
        (N, size, size, 3) float32 CLIP pixel values (transpose to NCHW for a torch-layout encoder).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {x.shape}")
    out_h, out_w = (size, size) if np.ndim(size) == 0 else size
    mh, mw = clip_resize_matrices(x.shape[1], x.shape[2], out_h, out_w)
    mh = jnp.asarray(mh, jnp.float32)
    mw = jnp.asarray(mw, jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # TPU/GPU default matmul precision would cost ~1e-3
    # The resize is done in [-1, 1] to match sgm (which resizes its [-1, 1] conditioning frames).
    x = x * 2.0 - 1.0
    x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=hi)
    x = jnp.einsum("pw,nowc->nopc", mw, x, precision=hi)
    x = (x + 1.0) / 2.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# PIL helpers and the VAE branch
# ----------------------------------------------------------------------------------------------------------------


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> "RGB", as diffusers' ``load_image`` / ``VaeImageProcessor.convert_to_rgb`` do
    (``convert("RGB")``).

    RGBA / LA: alpha is dropped, not composited over a background (PIL semantics). L: grey copied to the three
    channels. P: palette looked up. An RGB image is returned unchanged (same object).

    Note: the SVD pipeline itself never converts (its VideoProcessor has do_convert_rgb=False); an RGBA or L image
    passed straight to diffusers gives a 4- or 1-channel tensor that then fails in the VAE / CLIP processor.
    The documented usage goes through ``diffusers.utils.load_image``, which calls ``convert("RGB")`` first;
    this function is that step.
    """
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def pil_to_float(image: PIL.Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) float32 in [0, 1], as diffusers' ``pil_to_numpy`` (uint8 / 255) after ``to_rgb``."""
    return np.array(to_rgb(image)).astype(np.float32) / 255.0


def vae_preprocess_pil(image: PIL.Image.Image, height: int, width: int) -> np.ndarray:
    """VAE-branch preprocessing: diffusers' ``VideoProcessor(vae_scale_factor=8).preprocess(image, height, width)``.

    Steps: ``to_rgb`` (see there; a no-op for RGB input); height and width rounded *down* to multiples of 8
    (``get_default_height_width``); PIL ``image.resize((w, h), resample=LANCZOS, reducing_gap=None)``
    (aspect ratio not kept; PIL returns an unchanged copy when the size already matches); /255 in float32; 2x-1.

    Args:
        image: PIL image of any size (and any mode ``to_rgb`` accepts).
        height, width: target size in pixels (576, 1024 for SVD).

    Returns:
        (h, w, 3) float32 in [-1, 1], with h = height - height % 8 and w = width - width % 8. Add a batch axis and
        transpose for NCHW.
    """
    h = int(height) - int(height) % VAE_SCALE_FACTOR
    w = int(width) - int(width) % VAE_SCALE_FACTOR
    if h <= 0 or w <= 0:
        raise ValueError(f"height/width rounded down to multiples of {VAE_SCALE_FACTOR} must be > 0, got {h}x{w}")
    # Convert before resizing (load_image order): PIL resizes RGBA alpha-premultiplied, which we do not want to
    # leak into RGB, and a palette image would be resized with NEAREST on its indices.
    image = to_rgb(image)
    image = image.resize((w, h), resample=PIL.Image.Resampling.LANCZOS, reducing_gap=None)
    x = np.array(image).astype(np.float32) / 255.0
    return 2.0 * x - 1.0


def resize_float_lanczos(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) float array -> (height, width, C) float32 with PIL's LANCZOS per channel (mode "F"), the
    same filter the PIL path uses, without quantising to uint8."""
    chans = [PIL.Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F")
             .resize((width, height), resample=PIL.Image.LANCZOS, reducing_gap=None) for c in range(image.shape[-1])]
    return np.stack([np.asarray(c, np.float32) for c in chans], axis=-1)
