"""Writing networks in Stability's single-file names (the inverse of svd_jax/weights/sgm.py), for the tests."""

import numpy as np
from safetensors.numpy import save_file

from svd_jax.weights.sgm import CLIP_PREFIX, unet_sgm_name, vae_sgm_name


def open_clip_state(state: dict, n_layers: int) -> dict:
    """transformers CLIPVisionModelWithProjection tensors (numpy, PyTorch names) -> OpenCLIP's single-file names:
    q/k/v concatenated into in_proj, the projection transposed."""
    state = {k: v for k, v in state.items() if "position_ids" not in k}
    out = {CLIP_PREFIX + "conv1.weight": state.pop("vision_model.embeddings.patch_embedding.weight"),
           CLIP_PREFIX + "class_embedding": state.pop("vision_model.embeddings.class_embedding"),
           CLIP_PREFIX + "positional_embedding": state.pop("vision_model.embeddings.position_embedding.weight"),
           CLIP_PREFIX + "proj": np.ascontiguousarray(state.pop("visual_projection.weight").T)}
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for w in ("weight", "bias"):
            out[f"{CLIP_PREFIX}{b}.{w}"] = state.pop(f"vision_model.{a}.{w}")
    for i in range(n_layers):
        t, s = f"vision_model.encoder.layers.{i}.", f"{CLIP_PREFIX}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[f"{s}attn.in_proj_{w}"] = np.concatenate([state.pop(f"{t}self_attn.{x}_proj.{w}") for x in "qkv"])
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{s}{b}.{w}"] = state.pop(f"{t}{a}.{w}")
    assert not state, sorted(state)
    return out


def sgm_named(state: dict, rename) -> dict:
    """PyTorch-named tensors -> the single file's names (``rename``), VAE attention projections as 1x1 convs."""
    out = {}
    for name, v in state.items():
        sgm = rename(name)
        v = np.ascontiguousarray(v, np.float32)
        if ".attn_1." in sgm and sgm.split(".")[-2] in ("q", "k", "v", "proj_out") and sgm.endswith("weight"):
            v = v.reshape(v.shape + (1, 1))
        out[sgm] = v
    return out


def write_single_file(path, unet=None, vae=None, clip=None, extra=None):
    """One safetensors file of Stability's names from (state, Flax module) pairs of the UNet and VAE and
    (state, layers) of the CLIP image encoder; ``extra`` tensors added as they are."""
    out = {}
    if unet is not None:
        out.update(sgm_named(unet[0], lambda n: unet_sgm_name(n, unet[1])))
    if vae is not None:
        out.update(sgm_named(vae[0], lambda n: vae_sgm_name(n, vae[1])))
    if clip is not None:
        out.update({k: np.ascontiguousarray(v, np.float32) for k, v in open_clip_state(dict(clip[0]), clip[1]).items()})
    out.update(extra or {})
    save_file(out, str(path))
    return path


def tiny_checkpoint_as_single_file(folder, path):
    """svd_jax.tiny's checkpoint folder -> the same networks in one file of Stability's names."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    from svd_jax.models import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    folder = Path(folder)
    cfg = {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae", "image_encoder")}
    unet = UNetSpatioTemporalConditionModel.from_config(cfg["unet"])
    vae = AutoencoderKLTemporalDecoder.from_config(cfg["vae"])
    return write_single_file(
        path, (load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")), unet),
        (load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")), vae),
        (load_file(str(folder / "image_encoder" / "model.safetensors")), cfg["image_encoder"]["num_hidden_layers"]))
