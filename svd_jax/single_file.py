"""Stability's original single-file SVD checkpoints as whole pipelines: read directly, or written out as a
diffusers-layout (or Flax-layout) pipeline folder.

* :func:`inspect_single_file` reads only the file's header: which networks it holds and which SVD variant it is.
* :func:`pipeline_from_single_file` is ``StableVideoDiffusionPipeline.from_single_file``: the UNet, the VAE
  (encoder + quant_conv from the conditioner's autoencoder, the temporal decoder from the first stage model) and
  the OpenCLIP image encoder from the one file (svd_jax/weights/sgm.py), the scheduler and image processor from
  SVD's known configs (svd_jax/configs.py).
* :func:`convert_single_file` (``svd-jax convert FILE OUT --to diffusers|flax``) writes a complete pipeline
  folder that diffusers' ``StableVideoDiffusionPipeline.from_pretrained(OUT)`` and svd-jax load.

Variants: ``svd.safetensors`` (14 frames), ``svd_xt.safetensors`` and ``svd_xt_1_1.safetensors`` (25 frames;
Stability recommends fps 6 and motion bucket 127 for 1.1) share one architecture, so the frame count comes from
the file name (``num_frames=`` overrides). The image-decoder variants (``svd_image_decoder``,
``svd_xt_image_decoder``) decode frame by frame with a 2-D decoder and quant convs: refused, naming the variant.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .weights.errors import CheckpointError
from .weights.sgm import CLIP_PREFIX, UNET_PREFIX, VAE_DECODER_PREFIX, VAE_ENCODER_PREFIX

COMPONENT_PREFIXES = {"unet": (UNET_PREFIX,), "vae": (VAE_DECODER_PREFIX, VAE_ENCODER_PREFIX),
                      "image_encoder": (CLIP_PREFIX,)}
NUMERICS = ("diffusers", "sgm")  # the UNet's resnet GroupNorm eps: diffusers' (the default) or sgm's
SGM_RESNET_EPS = 1e-5
CLIP_CONFIG_KEYS = dict(architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model")


def inspect_single_file(path) -> dict:
    """From the header only: {"components": [names present], "variant": "svd" | "svd_xt" | "svd_xt_1_1" |
    "unknown", "num_frames": 14 | 25, "image_decoder": bool}. Raises CheckpointError for a file that is not a
    readable safetensors file or holds no SVD network in Stability's names."""
    from .weights.safetensors_io import read_safetensors_header

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file (a single-file checkpoint is one .safetensors file)")
    keys = set(read_safetensors_header(p)[0])
    comps = [c for c, prefixes in COMPONENT_PREFIXES.items() if all(any(k.startswith(x) for k in keys)
                                                                     for x in prefixes)]
    if not comps:
        diffusers = any(k.startswith(("down_blocks.", "encoder.", "decoder.", "vision_model.")) for k in keys)
        raise CheckpointError(f"{p}: holds no network in Stability's single-file names (model.diffusion_model.*, "
                              f"first_stage_model.*, conditioner.embedders.*)"
                              + ("; it has diffusers names: load its folder with from_pretrained" if diffusers else ""))
    decoder = [k for k in keys if k.startswith(VAE_DECODER_PREFIX)]
    image_decoder = bool(decoder) and not any(".time_stack." in k or "time_mix_conv" in k for k in decoder)
    name = p.name.lower()
    variant = ("svd_xt_1_1" if "svd_xt_1_1" in name else "svd_xt" if "svd_xt" in name
               else "svd" if name.startswith("svd") else "unknown")
    return {"components": comps, "variant": variant, "num_frames": 14 if variant == "svd" else 25,
            "image_decoder": image_decoder or "image_decoder" in name}


def read_configs(folder) -> dict:
    """{"unet", "vae", "image_encoder": config dict} from a folder holding ``<component>/config.json`` (a
    diffusers pipeline folder or hub snapshot of the same architecture; its weights are not read)."""
    root = Path(folder)
    out = {}
    for name in COMPONENT_PREFIXES:
        f = root / name / "config.json"
        if not f.is_file():
            raise CheckpointError(f"configs {root}: no {name}/config.json (a folder of the pipeline's component "
                                  "configs, such as a diffusers pipeline folder)")
        try:
            out[name] = json.loads(f.read_text())
        except ValueError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from e
    return out


def _configs(configs, num_frames: int | None, default_frames: int) -> dict:
    """SVD-XT's configs (the UNet with ``num_frames``), replaced by those of ``configs``: a dict by component,
    or a folder (:func:`read_configs`). An explicit ``num_frames`` wins; else a given UNet config's own; else the
    file's default."""
    from .configs import SVD_CLIP, SVD_VAE, SVD_XT_UNET

    if configs is not None and not isinstance(configs, dict):
        configs = read_configs(configs)
    out = {"unet": {**SVD_XT_UNET, "num_frames": default_frames}, "vae": dict(SVD_VAE),
           "image_encoder": {**CLIP_CONFIG_KEYS, **SVD_CLIP}}
    for k, v in (configs or {}).items():
        if k not in out:
            raise ValueError(f"configs: unknown component {k!r}; the components are {sorted(out)}")
        out[k] = dict(v)
    if num_frames is not None:
        out["unet"]["num_frames"] = num_frames
    return out


def _check_loadable(info: dict, path) -> None:
    if info["image_decoder"]:
        raise CheckpointError(f"{path}: an image-decoder variant ({info['variant']}_image_decoder: a frame-wise 2-D "
                              "decoder with quant convs) is not supported; use svd.safetensors / svd_xt.safetensors "
                              "(the temporal decoder)")
    missing = [c for c in COMPONENT_PREFIXES if c not in info["components"]]
    if missing:
        raise CheckpointError(f"{path}: the file lacks {missing} (prefixes "
                              f"{[p for c in missing for p in COMPONENT_PREFIXES[c]]}); a pipeline needs all three")


def pipeline_from_single_file(cls, path, dtype="auto", *, mesh=None, fsdp: bool = False,
                              num_frames: int | None = None, configs: dict | None = None, attention: str = "auto",
                              options=None, scheduler=None, scheduler_config: dict | None = None,
                              numerics: str = "diffusers"):
    """``StableVideoDiffusionPipeline.from_single_file``; see that method."""
    from . import preprocessing as pre
    from .configs import SVD_SCHEDULER
    from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
    from .pipeline.pipeline import _merge_options, resolve_dtype
    from .samplers import make_scheduler
    from .scheduler import EulerScheduler
    from .sharding import Partitioner

    options = _merge_options(options, attention)
    info = inspect_single_file(path)
    _check_loadable(info, path)
    cfg = _configs(configs, num_frames, info["num_frames"])
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, not {numerics!r}")
    if numerics == "sgm":
        cfg["unet"]["resnet_eps"] = SGM_RESNET_EPS
    sched = scheduler if scheduler is not None and not isinstance(scheduler, str) else \
        make_scheduler(scheduler or "euler", EulerScheduler.from_config(SVD_SCHEDULER), scheduler_config)
    dtype = resolve_dtype(dtype, mesh)
    part = Partitioner(mesh, fsdp) if mesh is not None else None
    kw = dict(dtype=dtype, param_sharding=part.param_sharding if part is not None else None)
    unet, up = UNetSpatioTemporalConditionModel.from_single_file(path, cfg["unet"], **kw)
    vae, vp = AutoencoderKLTemporalDecoder.from_single_file(path, cfg["vae"], **kw)
    enc, ep = CLIPVisionModelWithProjection.from_single_file(path, cfg["image_encoder"], **kw)
    return cls(unet, vae, enc, sched, {"unet": up, "vae": vp, "image_encoder": ep}, dtype, pre.CLIP_MEAN,
               pre.CLIP_STD, part, options=options)


def convert_single_file(src, dst, *, to: str = "diffusers", dtype: Any = None, overwrite: bool = False,
                        num_frames: int | None = None, configs=None, log=None) -> Path:
    """Write the single file ``src`` as a pipeline folder ``dst``: ``to="diffusers"`` (model_index.json, unet/,
    vae/, image_encoder/ with config.json + safetensors in PyTorch names, scheduler/, feature_extractor/) or
    ``"flax"`` (the same, then svd-jax's Flax layout, svd_jax/convert.py). ``dtype``: the weights' dtype (None:
    float32). ``configs``: the networks' configs (a dict by component or a folder, :func:`read_configs`;
    default SVD-XT's). Every tensor is checked before anything is written; ``dst`` must be absent or empty unless
    ``overwrite``."""
    import numpy as np

    from .configs import CLIP_PROCESSOR_CONFIG, MODEL_INDEX, SVD_SCHEDULER_CONFIG
    from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
    from .weights import params_to_torch_state
    from .weights.safetensors_io import write_safetensors

    if to not in ("diffusers", "flax"):
        raise ValueError(f"--to must be 'diffusers' or 'flax', not {to!r}")
    log = log or (lambda m: None)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst} exists and is not empty; choose a new folder or pass --overwrite")
    info = inspect_single_file(src)
    _check_loadable(info, src)
    cfg = _configs(configs, num_frames, info["num_frames"])
    out_dtype = np.dtype(dtype or "float32") if str(dtype) != "bfloat16" else None
    import jax.numpy as jnp

    loaded = {}
    for name, cls in (("unet", UNetSpatioTemporalConditionModel), ("vae", AutoencoderKLTemporalDecoder),
                      ("image_encoder", CLIPVisionModelWithProjection)):  # all checked before anything is written
        loaded[name] = cls.from_single_file(src, cfg[name], dtype=jnp.float32)
    target = Path(tempfile.mkdtemp(prefix=".single-file-", dir=dst.parent if dst.parent.exists() else None)) \
        if to == "flax" else dst
    try:
        files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "image_encoder": "model.safetensors"}
        classes = {"unet": "UNetSpatioTemporalConditionModel", "vae": "AutoencoderKLTemporalDecoder"}
        for name, (_, params) in loaded.items():
            folder = target / name
            folder.mkdir(parents=True, exist_ok=True)
            state = params_to_torch_state(params)
            if out_dtype is None:  # bfloat16
                import ml_dtypes

                state = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
            else:
                state = {k: v.astype(out_dtype) for k, v in state.items()}
            config = dict(cfg[name])
            if name in classes:
                config = {"_class_name": classes[name], **{k: v for k, v in config.items() if k != "_class_name"}}
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            specs = [(k, v.dtype, v.shape) for k, v in state.items()]
            write_safetensors(folder / files[name], specs, iter(state.values()), metadata={"format": "pt"})
            log(f"{name}: {len(state)} tensors -> {folder}")
        for name, fname, obj in (("scheduler", "scheduler_config.json", SVD_SCHEDULER_CONFIG),
                                 ("feature_extractor", "preprocessor_config.json", CLIP_PROCESSOR_CONFIG)):
            (target / name).mkdir(parents=True, exist_ok=True)
            (target / name / fname).write_text(json.dumps(obj, indent=2) + "\n")
        (target / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
        if to == "flax":
            from .convert import convert_checkpoint

            convert_checkpoint(target, dst, overwrite=overwrite, log=log)
    finally:
        if to == "flax":
            shutil.rmtree(target, ignore_errors=True)
    return dst


def looks_like_single_file(path) -> bool:
    """A local ``.safetensors`` file (what ``--model`` / ``convert`` treat as a single-file checkpoint)."""
    return str(path).endswith(".safetensors") and os.path.isfile(os.path.expanduser(str(path)))
