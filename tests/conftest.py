"""Shared fixtures: tiny PyTorch reference models (diffusers / transformers), perturbed and saved to disk.

Every parameter is perturbed away from its init (norm scales away from 1, biases and mix factors away from 0)
so that no branch of the port can hide behind a zero or a one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if "SVD_JAX_CACHE_DIR" not in os.environ:  # the pipeline's compile cache: a fresh one per test session
    import tempfile

    os.environ["SVD_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="svd-jax-test-xla-")

import torch  # noqa: E402

from svd_jax.configs import CLIP_PROCESSOR_CONFIG, SVD_SCHEDULER_CONFIG, TINY_CLIP, TINY_UNET, TINY_VAE  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))

# Names and shapes of every tensor of the published SVD-XT checkpoint (unet/, vae/, image_encoder/), one per line.
REFERENCE = Path(__file__).resolve().parent / "data" / "svd_param_keys.txt"

# Tiny VAE configs that exercise every structural branch: 4 levels (8x, shortcuts where channels change),
# an attention encoder block, layers_per_block 1 (mid attention owned but unused) and 3 (extra mid resnet).
VAE_CONFIGS = {
    "svd_like": dict(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                     layers_per_block=2, latent_channels=4),
    "attn_lpb1": dict(block_out_channels=(32, 64), down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
                      layers_per_block=1, latent_channels=3),
    "lpb3": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=3,
                 latent_channels=4),
}

CLIP_CONFIGS = {
    "gelu": dict(hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2, num_attention_heads=4,
                 image_size=224, patch_size=32, hidden_act="gelu", layer_norm_eps=1e-5),
    "quick_gelu": dict(hidden_size=48, intermediate_size=64, projection_dim=16, num_hidden_layers=3,
                       num_attention_heads=2, image_size=60, patch_size=12, hidden_act="quick_gelu",
                       layer_norm_eps=1e-6),
}


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter and persistent float buffer away from its init, deterministically."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if name.endswith("mix_factor"):
            p.copy_(noise)  # sigmoid(mix) far from 0.5, different per block
        elif p.ndim == 1 and name.endswith("weight"):  # norm scales
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias") or p.ndim == 1:
            p.add_(0.1 * noise)
        else:
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
            p.add_(0.5 * scale * noise)
    for name, p in model.state_dict().items():
        if p.is_floating_point():
            assert not torch.all(p == 0) and not torch.all(p == 1), f"{name} still trivial"
    return model.eval()


def make_vae(cfg: dict, seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    return perturb_(AutoencoderKLTemporalDecoder(**cfg), seed)


def make_clip(cfg: dict, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).float()
    return perturb_(model, seed)


def make_unet_pair(cfg: dict, folder, torch_seed: int = 0, perturb_seed: int = 0):
    """A perturbed diffusers UNet of ``cfg`` saved to ``folder`` and loaded back by svd-jax: (torch model, Flax
    module, Flax params)."""
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    from svd_jax.models import UNetSpatioTemporalConditionModel

    torch.manual_seed(torch_seed)
    model = perturb_(TorchUNet(**cfg), seed=perturb_seed)
    model.save_pretrained(folder)
    module, params = UNetSpatioTemporalConditionModel.from_pretrained(folder)
    return model, module, params


@pytest.fixture(scope="session")
def tiny_vaes(tmp_path_factory):
    """{name: (torch model, saved folder)} for every VAE_CONFIGS entry."""
    out = {}
    for i, (name, cfg) in enumerate(VAE_CONFIGS.items()):
        model = make_vae(cfg, seed=i)
        folder = tmp_path_factory.mktemp(f"vae_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="session")
def tiny_clips(tmp_path_factory):
    """{name: (torch model, saved folder)} for every CLIP_CONFIGS entry."""
    out = {}
    for i, (name, cfg) in enumerate(CLIP_CONFIGS.items()):
        model = make_clip(cfg, seed=10 + i)
        folder = tmp_path_factory.mktemp(f"clip_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def rel_err(a, b) -> float:
    """max|a - b| / max|b|, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x) -> torch.Tensor:
    """(N, H, W, C) numpy -> (N, C, H, W) torch float32."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().permute(0, 2, 3, 1).numpy()


def reference_keys(component: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of one full-size SVD-XT component from tests/data/svd_param_keys.txt."""
    out = {}
    for line in REFERENCE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        comp, name = key.split("/", 1)
        if comp == component:
            out[name] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


def _torch_kwargs(cfg: dict, keys, **overrides) -> dict:
    """The entries ``keys`` of one svd_jax.configs config (lists as tuples, the diffusers constructors' types),
    then ``overrides``: constructor arguments for a torch reference model of the same architecture."""
    return {**{k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in keys}, **overrides}


# The tiny reference pipeline: the architecture of svd_jax.tiny's checkpoint (svd_jax.configs.TINY_*), built by
# the torch constructors from the architecture keys only (the rest at the constructors' defaults), with 3 frames
# in the UNet's config (the checkpoint says 4).
TINY_PIPE_UNET = _torch_kwargs(
    TINY_UNET, ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
                "num_attention_heads", "cross_attention_dim", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "layers_per_block"), num_frames=3)
TINY_PIPE_VAE = _torch_kwargs(TINY_VAE, ("block_out_channels", "down_block_types", "layers_per_block",
                                         "latent_channels"))
TINY_PIPE_CLIP = _torch_kwargs(TINY_CLIP, ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                                           "num_attention_heads", "image_size", "patch_size", "hidden_act"))


def make_tiny_pipeline(seed: int = 0):
    """A diffusers StableVideoDiffusionPipeline of tiny, perturbed components (fp32)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    unet = perturb_(TorchUNet(**TINY_PIPE_UNET), seed)
    vae = make_vae(TINY_PIPE_VAE, seed + 1)
    clip = make_clip(TINY_PIPE_CLIP, seed + 2)
    fe = CLIPImageProcessor(**CLIP_PROCESSOR_CONFIG)
    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=clip, unet=unet, scheduler=scheduler,
                                        feature_extractor=fe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(diffusers pipeline, folder it was saved to with save_pretrained)."""
    pipe = make_tiny_pipeline()
    folder = tmp_path_factory.mktemp("tiny_svd")
    pipe.save_pretrained(folder)
    return pipe, folder


# Compile-time savers for the runs that demonstrate rather than compare numbers (notebooks, README blocks): XLA
# compiling the tiny programs is most of their time, and these codegen options halve it twice over (LLVM
# optimisation off; the older CPU emitters). Used only if this jaxlib knows them: XLA aborts on an unknown flag.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def fast_compile_options() -> dict:
    """FAST_COMPILE_FLAGS as ``compile(compiler_options=...)`` for one in-process compile (a jaxlib that does
    not know one raises JaxRuntimeError: compile without them then)."""
    parse = lambda v: {"true": True, "false": False}.get(v, int(v) if v.isdigit() else v)
    return {k: parse(v) for k, v in (f.lstrip("-").split("=", 1) for f in FAST_COMPILE_FLAGS)}


@pytest.fixture(scope="session")
def fast_xla_flags():
    """devices -> an XLA_FLAGS value: that many simulated CPU devices (None: leave the count to the script) plus
    the FAST_COMPILE_FLAGS accepted here."""
    import subprocess
    import sys

    def accepted(flags):
        env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
        probe = [sys.executable, "-c", "import jax; jax.devices()"]
        return subprocess.run(probe, check=False, env=env, capture_output=True, timeout=300).returncode == 0

    fast = [f for f in FAST_COMPILE_FLAGS if accepted([f])]
    return lambda devices=None: " ".join(
        ([] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]) + fast)


def torch_edm_loss(model, x0, image_latents, image_embeds, added_time_ids, sigma, noise):
    """The fine-tuning objective as the training spec writes it, on diffusers' UNet (numpy channels-last inputs,
    as svd_jax.training.denoising_loss takes them): a torch scalar with autograd."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
    s = t(sigma)[:, None, None, None, None]
    x0_t = t(x0).permute(0, 1, 4, 2, 3)
    x = x0_t + s * t(noise).permute(0, 1, 4, 2, 3)
    c_in, c_skip, c_out = 1 / torch.sqrt(s**2 + 1), 1 / (s**2 + 1), -s / torch.sqrt(s**2 + 1)
    z = t(image_latents).permute(0, 3, 1, 2)[:, None].expand(-1, x.shape[1], -1, -1, -1)
    v = model(torch.cat([c_in * x, z], dim=2), 0.25 * torch.log(t(sigma)), t(image_embeds), t(added_time_ids)).sample
    w = (s**2 + 1) / s**2
    return torch.mean(w * (c_skip * x + c_out * v - x0_t) ** 2)
