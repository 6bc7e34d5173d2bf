"""Stability's original single-file SVD checkpoints (``svd.safetensors``, ``svd_xt.safetensors``,
``svd_xt_1_1.safetensors``; sgm's ``DiffusionEngine`` names): the rule-based name mapping to diffusers' names, and
the strict loader behind ``from_single_file``.

The mapping is written from diffusers' side: for every tensor a model needs (its diffusers name, from the Flax
parameter tree), :func:`sgm_name` gives the name it has in the single file. Loading is then strict both ways:

* every needed tensor must be in the file with the shape the config implies (else a :class:`CheckpointError`
  naming it and the file's closest names);
* every tensor of the file under the component's prefix must be consumed, or be one the component does not use,
  (the OpenCLIP text tower's leftovers outside ``.visual.`` are outside the image encoder's prefix),
  ignored by name (:data:`IGNORED`): the conditioner autoencoder's decoder and ``post_quant_conv``, and
  ``first_stage_model.encoder`` (the VAE's encoder is taken from ``conditioner.embedders.3.encoder``, the path
  that encodes the conditioning frame, with its ``quant_conv``; the first stage model has none).

Layouts: UNet tensors have diffusers' shapes already; the VAE's attention projections are 1x1 convolutions
(O, I, 1, 1) in the file and linear (O, I) in diffusers (squeezed as they load); OpenCLIP's attention holds q, k, v
in one ``in_proj`` (split in thirds, in that order) and its projection ``proj`` (hidden, projection) is
transformers' ``visual_projection.weight`` transposed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from .errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_DECODER_PREFIX = "first_stage_model.decoder."
VAE_ENCODER_PREFIX = "conditioner.embedders.3.encoder."  # its encoder.* and quant_conv.*
CLIP_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
# Tensors of a single file that no svd-jax model reads, by name
IGNORED = ("conditioner.embedders.3.encoder.decoder.", "conditioner.embedders.3.encoder.post_quant_conv.",
           "first_stage_model.encoder.", "first_stage_model.quant_conv.", "first_stage_model.post_quant_conv.")

_RES_UNET = {"spatial_res_block.norm1": "in_layers.0", "spatial_res_block.conv1": "in_layers.2",
             "spatial_res_block.time_emb_proj": "emb_layers.1", "spatial_res_block.norm2": "out_layers.0",
             "spatial_res_block.conv2": "out_layers.3", "spatial_res_block.conv_shortcut": "skip_connection",
             "temporal_res_block.norm1": "time_stack.in_layers.0", "temporal_res_block.conv1": "time_stack.in_layers.2",
             "temporal_res_block.time_emb_proj": "time_stack.emb_layers.1",
             "temporal_res_block.norm2": "time_stack.out_layers.0",
             "temporal_res_block.conv2": "time_stack.out_layers.3", "time_mixer.mix_factor": "time_mixer.mix_factor"}
_RES_VAE = {"spatial_res_block.norm1": "norm1", "spatial_res_block.conv1": "conv1",
            "spatial_res_block.norm2": "norm2", "spatial_res_block.conv2": "conv2",
            "spatial_res_block.conv_shortcut": "nin_shortcut", "temporal_res_block.norm1": "time_stack.in_layers.0",
            "temporal_res_block.conv1": "time_stack.in_layers.2", "temporal_res_block.norm2": "time_stack.out_layers.0",
            "temporal_res_block.conv2": "time_stack.out_layers.3", "time_mixer.mix_factor": "mix_factor",
            # the encoder's plain 2-D resnets
            "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _inner(rest: str, table: Mapping[str, str]) -> str:
    """``rest`` (e.g. ``"spatial_res_block.norm1.weight"``) with its longest table prefix renamed."""
    for key in sorted(table, key=len, reverse=True):
        if rest == key or rest.startswith(key + "."):
            return table[key] + rest[len(key):]
    raise KeyError(rest)


def _unet_block_inner(rest: str) -> str:
    """Inside a resnet (``resnets.j.<rest>``) or a transformer (``attentions.j.<rest>``) of the UNet."""
    try:
        return _inner(rest, _RES_UNET)
    except KeyError:
        pass
    rest = re.sub(r"^temporal_transformer_blocks\.(\d+)\.", r"time_stack.\1.", rest)
    rest = re.sub(r"^time_pos_embed\.linear_1\.", "time_pos_embed.0.", rest)
    return re.sub(r"^time_pos_embed\.linear_2\.", "time_pos_embed.2.", rest)


def unet_sgm_name(name: str, unet) -> str:
    """A diffusers UNet tensor name -> its name in the single file (``model.diffusion_model.`` included);
    ``unet`` the Flax module (its block types and layers per block)."""
    n = len(unet.block_out_channels)
    lpb = unet.layers_per_block
    layers = [lpb] * n if isinstance(lpb, int) else list(lpb)
    down_start = [1 + sum(layers[k] + 1 for k in range(i)) for i in range(n)]  # input_blocks index of level i
    r_layers = layers[::-1]
    up_start = [sum(r_layers[k] + 1 for k in range(i)) for i in range(n)]
    up_has_attn = [t.startswith("CrossAttn") for t in unet.up_block_types]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in fixed.items():
        if name.startswith(k + "."):
            return UNET_PREFIX + v + name[len(k):]
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:  # sgm numbers a level's blocks on from its first: resnet j is sub-block 0, its transformer 1
        start, root = (down_start, "input_blocks") if m[1] == "down" else (up_start, "output_blocks")
        block = start[int(m[2])] + int(m[4])
        return f"{UNET_PREFIX}{root}.{block}.{0 if m[3] == 'resnets' else 1}.{_unet_block_inner(m[5])}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", name)
    if m:
        i = int(m[1])
        return f"{UNET_PREFIX}input_blocks.{down_start[i] + layers[i]}.0.op.{m[2]}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(m[1], int(m[2]))]
        return f"{UNET_PREFIX}middle_block.{idx}.{_unet_block_inner(m[3])}"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", name)
    if m:
        i = int(m[1])
        if i >= n - 1:
            raise KeyError(name)
        last = up_start[i] + r_layers[i]
        return f"{UNET_PREFIX}output_blocks.{last}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
    raise KeyError(name)


def vae_sgm_name(name: str, vae) -> str:
    """A diffusers AutoencoderKLTemporalDecoder tensor name -> its name in the single file; ``vae`` the Flax
    module (its number of levels)."""
    n = len(vae.block_out_channels)
    if name.startswith("quant_conv."):
        return VAE_ENCODER_PREFIX + name
    if name.startswith("encoder."):
        prefix, rest = VAE_ENCODER_PREFIX + "encoder.", name[len("encoder."):]
    elif name.startswith("decoder."):
        prefix, rest = VAE_DECODER_PREFIX, name[len("decoder."):]
    else:
        raise KeyError(name)
    simple = {"conv_in": "conv_in", "conv_norm_out": "norm_out", "time_conv_out": "conv_out.time_mix_conv",
              "conv_out": "conv_out"}
    for k, v in simple.items():
        if rest.startswith(k + "."):
            return prefix + v + rest[len(k):]
    m = re.match(r"^mid_block\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{prefix}mid.block_{int(m[1]) + 1}.{_inner(m[2], _RES_VAE)}"
    m = re.match(r"^mid_block\.attentions\.0\.(.+)$", rest)
    if m:
        return f"{prefix}mid.attn_1.{_inner(m[1], _ATTN_VAE)}"
    m = re.match(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
    if m:
        return f"{prefix}down.{m[1]}.block.{m[2]}.{_inner(m[3], _RES_VAE)}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", rest)
    if m:
        return f"{prefix}down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
    if m:  # sgm stores the decoder's up list in resolution order
        return f"{prefix}up.{n - 1 - int(m[1])}.block.{m[2]}.{_inner(m[3], _RES_VAE)}"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", rest)
    if m:
        return f"{prefix}up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise KeyError(name)


def clip_sgm_name(name: str, clip):
    """A transformers CLIPVisionModelWithProjection tensor name -> its OpenCLIP name in the single file, or
    (name, transform) where the file stores it otherwise: q/k/v are thirds of the fused ``in_proj``, the
    projection is stored transposed."""
    fixed = {"vision_model.embeddings.class_embedding": "class_embedding",
             "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
             "vision_model.embeddings.position_embedding.weight": "positional_embedding",
             "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
             "vision_model.post_layernorm.weight": "ln_post.weight",
             "vision_model.post_layernorm.bias": "ln_post.bias"}
    if name in fixed:
        return CLIP_PREFIX + fixed[name]
    if name == "visual_projection.weight":
        return CLIP_PREFIX + "proj", lambda a: a.T
    m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$", name)
    if not m:
        raise KeyError(name)
    i, rest = m[1], m[2]
    base = f"{CLIP_PREFIX}transformer.resblocks.{i}."
    q = re.match(r"^self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
    if q:
        third = "qkv".index(q[1])
        return base + f"attn.in_proj_{q[2]}", lambda a, t=third: a[t * (a.shape[0] // 3):(t + 1) * (a.shape[0] // 3)]
    table = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    return base + _inner(rest, table)


def _is_vae_attention_projection(sgm: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", sgm))


def sgm_tensors(needed: Mapping[str, tuple], file_tensors: Mapping[str, np.ndarray], rename, prefixes, where: str,
                ignored=IGNORED) -> dict[str, np.ndarray]:
    """{diffusers name: array} for the ``needed`` diffusers names ({name: diffusers shape}), read from the
    single file's tensors through ``rename`` (diffusers name -> sgm name). Strict: a missing or misshapen tensor,
    or one under ``prefixes`` that nothing consumed and that is not ``ignored`` by name, raises
    CheckpointError naming it."""
    out, used, missing, wrong = {}, set(), [], []
    for name, shape in needed.items():
        sgm = rename(name)
        sgm, transform = sgm if isinstance(sgm, tuple) else (sgm, None)
        if sgm not in file_tensors:
            missing.append(sgm)
            continue
        arr = file_tensors[sgm]
        if transform is not None:
            arr = transform(arr)
        if _is_vae_attention_projection(sgm) and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr.reshape(arr.shape[:2])  # a 1x1 convolution in sgm, a linear layer in diffusers
        if tuple(arr.shape) != tuple(shape):
            wrong.append(f"{sgm}: {tuple(arr.shape)} in the file, {tuple(shape)} for {name} of this config")
            continue
        out[name] = arr
        used.add(sgm)
    leftover = sorted(k for k in file_tensors if k.startswith(tuple(prefixes)) and k not in used
                      and not k.startswith(tuple(ignored)))
    if missing or wrong or leftover:
        few = lambda items, sep, k: sep.join(items[:k]) + (sep + "..." if len(items) > k else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing ({few(missing, ', ', 5)})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape ({few(wrong, '; ', 3)})")
        if leftover:
            parts.append(f"{len(leftover)} unexpected under {', '.join(prefixes)} ({few(leftover, ', ', 5)})")
        hint = ""
        if missing and not any(k.startswith(tuple(prefixes)) for k in file_tensors):
            diffusers_names = ("down_blocks.", "encoder.", "decoder.", "vision_model.")
            hint = (f"; the file holds none of {', '.join(prefixes)}: not a Stability single-file SVD checkpoint"
                    + (" (it has diffusers names: use from_pretrained on its folder)"
                       if any(k.startswith(diffusers_names) for k in file_tensors) else ""))
        raise CheckpointError(f"{where}: " + "; ".join(parts) + hint)
    return out
