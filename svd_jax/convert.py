"""Offline converter: a diffusers/transformers SVD checkpoint -> svd-jax's Flax layout, which loads fast and lean.

    python -m convert SRC DST [--variant fp16] [--dtype bfloat16]      (or python -m svd_jax.convert)
    svd-jax convert SRC DST [--variant fp16] [--dtype bfloat16]

SRC is a hub repo id, a local diffusers pipeline folder (``model_index.json`` + ``unet/ vae/ image_encoder/
scheduler/ feature_extractor/``) or one component folder. DST gets the same folders. A model component's folder
holds its ``config.json`` (copied), ``flax_params.safetensors`` (keyed by Flax path, e.g.
``down_blocks_0/resnets_0/conv1/kernel``, already transposed, every tensor in one dtype) and
``flax_manifest.json`` (format and version, converter version, source, variant, dtype, tensor count). The other
components' config files and ``model_index.json`` are copied. ``from_pretrained`` recognises the folder by its
manifest and loads it without renaming or transposing (:func:`svd_jax.weights.load_flax_params`).

The conversion rules are :func:`svd_jax.weights.plan_conversion`'s, applied as strictly; tensors are read,
transposed, cast and written one at a time, so peak memory is about two tensors, not the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from .cli import add_convert_arguments
from .models import (
    AutoencoderKLTemporalDecoder,
    CLIPVisionModelWithProjection,
    UNetSpatioTemporalConditionModel,
)
from .weights import (
    CONFIG_NAME,
    FLAX_DTYPES,
    FLAX_FORMAT,
    FLAX_FORMAT_VERSION,
    FLAX_MANIFEST,
    FLAX_WEIGHTS,
    CheckpointError,
    Source,
    flatten_shapes,
    locate_tensors,
    model_key,
    plan_conversion,
    read_safetensors_header,
    read_tensor,
    resolve_checkpoint,
    tensors_digest,
    write_safetensors,
)

__all__ = ["MODEL_CLASSES", "add_arguments", "build_parser", "convert_checkpoint", "convert_component", "main", "run"]

MODEL_CLASSES = {c.__name__: c for c in (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder,
                                         CLIPVisionModelWithProjection)}
# Files never copied from a non-model component (weights of models svd-jax does not have).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".ckpt", ".pt", ".pth", ".onnx", ".h5")


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_class(config: dict, where: str):
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"{where}: a {name or 'unnamed'} model; svd-jax converts {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name]


def _default_dtype(src_dtypes: set) -> np.dtype:
    # Keep the source's dtype where it is one of the three; otherwise float32, which holds fp16 and bf16 exactly.
    if len(src_dtypes) == 1 and np.dtype(next(iter(src_dtypes))).name in FLAX_DTYPES:
        return np.dtype(next(iter(src_dtypes)))
    return np.dtype(np.float32)


def convert_component(
    source: Source | str,
    subfolder: str | None,
    dst: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: Any = None,
    log: Callable[[str], None] = _log_stderr,
) -> dict:
    """Convert one model component (``unet``, ``vae``, ``image_encoder``, or a component folder itself).

    Args:
      source: SRC (a local folder or hub repo id, or a :class:`~svd_jax.weights.Source`).
      subfolder: the component's folder inside SRC, or None when SRC is the component folder.
      dst: the output folder (created); gets ``config.json``, ``flax_params.safetensors``, ``flax_manifest.json``.
      variant: the diffusers weights variant to read (``"fp16"``).
      dtype: output dtype (``"bfloat16"``, ``"float16"``, ``"float32"``); None keeps the source's.

    Returns:
      The manifest written (a dict).
    """
    t0 = time.perf_counter()
    src = source if isinstance(source, Source) else Source(source)
    dst = Path(dst)
    if src.local is not None and (src.local / (subfolder or "") / FLAX_MANIFEST).is_file():
        raise CheckpointError(f"{src.local / (subfolder or '')} is already converted (it has {FLAX_MANIFEST})")
    files = resolve_checkpoint(src, subfolder, variant=variant)
    try:
        config = json.loads(files.config.read_text())
    except ValueError as e:
        raise CheckpointError(f"{files.config}: not valid JSON: {e}") from e
    cls = _model_class(config, files.source)
    module = cls.from_config(config)
    target = flatten_shapes(module.init_params_abstract())

    located = locate_tensors(files.weights)  # checkpoint name -> (file, TensorInfo); headers only, no data
    plan = plan_conversion(target, {k: v.shape for k, (_, v) in located.items()}, ignore=cls._ignore_keys,
                           what=f"{cls.__name__} weights in {files.source}")
    by_path = {path: (name, t) for name, (path, t) in plan.entries.items()}
    src_dtypes = {located[name][1].dtype for name in plan.entries}
    out_dtype = _default_dtype(src_dtypes) if dtype is None else np.dtype(jnp.dtype(dtype))
    if out_dtype.name not in FLAX_DTYPES:
        raise ValueError(f"dtype must be one of {list(FLAX_DTYPES)}, not {out_dtype.name!r}")

    order = list(target)  # the model's order, which is also the order the loader reads in
    specs = [("/".join(p), out_dtype, tuple(target[p])) for p in order]

    def arrays():
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(open(f, "rb", buffering=0)) for f in files.weights}
            for p in order:
                name, t = by_path[p]
                f, info = located[name]
                view = t.fn(read_tensor(handles[f], info))  # the PyTorch tensor, a transposed view of it
                out = np.empty(view.shape, out_dtype)
                out[...] = view  # transpose and cast in one copy
                yield out

    dst.mkdir(parents=True, exist_ok=True)
    (dst / FLAX_MANIFEST).unlink(missing_ok=True)  # the manifest marks a complete folder: written last
    partial = dst / (FLAX_WEIGHTS + ".partial")
    nbytes = write_safetensors(partial, specs, arrays(), metadata={"format": "flax", "svd_jax_format": FLAX_FORMAT})
    os.replace(partial, dst / FLAX_WEIGHTS)
    written, _ = read_safetensors_header(dst / FLAX_WEIGHTS)  # what the loader will see, checked as it will be
    shutil.copyfile(files.config, dst / CONFIG_NAME)

    from . import __version__

    rev = re.search(r"/snapshots/([0-9a-f]{40})/", files.config.as_posix())
    manifest = {
        "format": FLAX_FORMAT,
        "format_version": FLAX_FORMAT_VERSION,
        "converter": "svd_jax.convert",
        "converter_version": __version__,
        "class_name": cls.__name__,
        "source": src.describe(),
        "source_subfolder": subfolder,
        "source_revision": rev.group(1) if rev else src.revision,
        "source_files": [f.name for f in files.weights],
        "source_dtypes": sorted(np.dtype(d).name for d in src_dtypes),
        "variant": variant,
        "dtype": out_dtype.name,
        "num_tensors": len(specs),
        # The file was checked against this model (plan_conversion above): with both, the loader skips eval_shape.
        "model_key": model_key(cls.__name__, config),
        "tensors_digest": tensors_digest(written),
        "num_params": int(sum(int(np.prod(s)) for _, _, s in specs)),
        "ignored_tensors": plan.ignored,
        "nbytes": nbytes,
    }
    (dst / FLAX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"{files.source}: {len(specs)} tensors, {manifest['num_params'] / 1e6:.1f} M params, "
        f"{'/'.join(manifest['source_dtypes'])} -> {out_dtype.name}, {nbytes / 1e9:.2f} GB in "
        f"{time.perf_counter() - t0:.1f} s -> {dst}")
    return manifest


def _copy_component(src: Source, name: str, class_name: str | None, dst: Path) -> None:
    # A component with no weights svd-jax converts (scheduler, feature extractor): its config files, as they are.
    if src.local is not None:
        folder = src.local / name
        if not folder.is_dir():
            raise CheckpointError(f"{src.local}: model_index.json lists {name!r}, but there is no {name}/ folder")
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copyfile(f, dst / f.name)
        return
    names = ["scheduler_config.json"] if (class_name or "").endswith("Scheduler") else \
        ["preprocessor_config.json"] if name == "feature_extractor" or "Processor" in (class_name or "") else \
        ["config.json"]
    for n in names:
        p = src.file(f"{name}/{n}")
        if p is None:
            raise CheckpointError(f"{src.src}: {name}/{n} could not be fetched")
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst / n)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    log: Callable[[str], None] = _log_stderr,
) -> Path:
    """Convert a pipeline (or one component) from the diffusers/transformers layout to the Flax layout.

    Args:
      src: hub repo id, local pipeline folder (``model_index.json``) or local component folder (``config.json``).
      dst: output folder; must be absent or empty unless ``overwrite``.
      variant: diffusers weights variant to read (``"fp16"``); recorded in each manifest.
      dtype: output dtype, ``"bfloat16"``, ``"float16"`` or ``"float32"``; None keeps the source's.
      overwrite: write into a non-empty ``dst`` (files of the same names are replaced).
      revision, cache_dir, local_files_only: for hub repo ids (``huggingface_hub``).
      log: called with one line per component.

    Returns:
      ``dst`` as a Path.
    """
    source = Source(src, revision, cache_dir, local_files_only)
    dst = Path(dst)
    if source.local is not None and dst.resolve() == source.local.resolve():
        raise CheckpointError(f"{dst}: the destination must differ from the source")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst} exists and is not empty; choose a new folder or pass --overwrite")
    index_path = source.file("model_index.json")
    if index_path is None:  # a single component
        if source.local is not None and not (source.local / CONFIG_NAME).is_file():
            raise CheckpointError(f"{source.local}: neither a pipeline folder (model_index.json) nor a component "
                                  f"folder ({CONFIG_NAME} + weights); found "
                                  f"{sorted(x.name for x in source.local.iterdir()) or 'an empty folder'}")
        convert_component(source, None, dst, variant=variant, dtype=dtype, log=log)
        return dst
    try:
        index = json.loads(index_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{index_path}: not valid JSON: {e}") from e
    components = {k: v for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}
    # Models first (each checked strictly before anything of it is written), then the config-only components.
    for name, (_, class_name) in components.items():
        if class_name in MODEL_CLASSES:
            convert_component(source, name, dst / name, variant=variant, dtype=dtype, log=log)
    for name, (_, class_name) in components.items():
        if class_name not in MODEL_CLASSES:
            _copy_component(source, name, class_name, dst / name)
    shutil.copyfile(index_path, dst / "model_index.json")
    return dst


# The arguments live in the CLI module, which imports nothing heavy (``svd-jax --help`` stays instant).
add_arguments = add_convert_arguments


def build_parser(prog: str = "python -m convert") -> argparse.ArgumentParser:
    """The argument parser of the converter command."""
    p = argparse.ArgumentParser(prog=prog, description="Convert a diffusers SVD checkpoint to svd-jax's Flax layout "
                                "(fast, lean, shardable loading).")
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; a :class:`CheckpointError` is printed, exit code 1."""
    log = (lambda m: None) if args.quiet else _log_stderr
    to = getattr(args, "to", None)
    try:
        if str(args.src).endswith(".safetensors"):  # one of Stability's single files
            from .single_file import convert_single_file

            out = convert_single_file(args.src, args.dst, to=to or "diffusers", dtype=args.dtype,
                                      overwrite=args.overwrite, configs=getattr(args, "configs", None), log=log)
        elif to == "diffusers":
            raise CheckpointError(f"{args.src} is in the diffusers layout already; --to diffusers converts single "
                                  ".safetensors files (--to flax converts this)")
        else:
            out = convert_checkpoint(args.src, args.dst, variant=args.variant, dtype=args.dtype,
                                     overwrite=args.overwrite, revision=args.revision, cache_dir=args.cache_dir,
                                     local_files_only=args.local_files_only, log=log)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main(argv=None, prog: str = "python -m convert") -> int:
    """Entry point of ``python -m convert``; returns the exit code."""
    return run(build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m svd_jax.convert"))
