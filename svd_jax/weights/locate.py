"""Finding a checkpoint's files, in a local folder or a hub repo, through one :class:`Source`.

* :class:`Source`: a local folder or a hub repo id (told apart by :func:`looks_like_local_path`), and one way to
  get a file of it (:meth:`Source.file`: the local path, or downloaded through ``huggingface_hub`` one file at a
  time, only those needed).
* :func:`resolve_checkpoint`: ``config.json`` and the safetensors weights of one component, either layout
  (diffusers/transformers, or the converted Flax folder recognised by its manifest), local or hub.
* :func:`resolve_pipeline_root`: a whole pipeline's folder (a hub repo is downloaded with only the files the
  pipeline reads).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import CheckpointError
from .flax_layout import FLAX_MANIFEST, FLAX_WEIGHTS

__all__ = [
    "CONFIG_NAME",
    "DIFFUSERS_WEIGHTS",
    "TRANSFORMERS_WEIGHTS",
    "CheckpointFiles",
    "Source",
    "add_variant",
    "index_names",
    "index_shards",
    "looks_like_local_path",
    "pipeline_allow_patterns",
    "resolve_checkpoint",
    "resolve_pipeline_root",
]

CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

_LAYOUTS = (f"a diffusers/transformers component folder ({CONFIG_NAME} + safetensors weights) or a converted Flax "
            f"folder ({CONFIG_NAME} + {FLAX_MANIFEST} + {FLAX_WEIGHTS})")


def looks_like_local_path(path_or_repo: str | os.PathLike) -> bool:
    """True for what cannot be a hub repo id (``name`` or ``owner/name``): an absolute path, one starting with
    ``.`` or ``~``, or one with more than one ``/``."""
    s = str(path_or_repo)
    return Path(s).is_absolute() or s.startswith((".", "~")) or s.count("/") > 1


class Source:
    """Where a checkpoint's files come from: a local folder, or a hub repo (files fetched one by one, only those
    asked for, through ``huggingface_hub``'s cache).

    Attributes:
      src: ``path_or_repo`` as a string; local: the folder (``~`` expanded) when it is one, else None;
      revision, cache_dir, local_files_only: passed to ``huggingface_hub`` for a repo id.

    Raises:
      CheckpointError when ``path_or_repo`` is no folder and cannot be a repo id (:func:`looks_like_local_path`).
    """

    def __init__(self, path_or_repo: str | os.PathLike, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False):
        self.src, self.revision, self.cache_dir, self.local_files_only = (
            str(path_or_repo), revision, cache_dir, local_files_only)
        local = Path(path_or_repo).expanduser()
        self.local: Path | None = local if local.is_dir() else None
        if self.local is None and looks_like_local_path(path_or_repo):
            raise CheckpointError(f"{path_or_repo}: no such folder (and not a hub repo id 'owner/name')")

    def file(self, relpath: str) -> Path | None:
        """The local path of ``relpath`` (``/``-separated) in the source, downloading it from a hub repo; None
        where there is no such file (or, offline, it is not in the cache)."""
        if self.local is not None:
            p = self.local / relpath
            return p if p.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.src, relpath, revision=self.revision, cache_dir=self.cache_dir,
                                        local_files_only=self.local_files_only))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
        except RepositoryNotFoundError as e:
            raise CheckpointError(f"{self.src}: not a local folder and not a hub repository you can access") from e

    def describe(self) -> str:
        """The source for a manifest or a message: the resolved local folder, or the repo id."""
        return str(self.local.resolve()) if self.local is not None else self.src


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """Where one component's files are: its config and its safetensors files (one, or the shards of an index)."""

    config: Path
    weights: tuple[Path, ...]
    source: str  # human-readable origin, for error messages
    manifest: Path | None = None  # set for the Flax layout (``flax_manifest.json``); weights is then one file


def add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` + ``fp16`` -> ``model.fp16.safetensors`` (the diffusers/transformers convention)."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def index_names(base: str, variant: str | None) -> list[str]:
    """The names of ``base``'s shard index, in order of preference: ``<base>.index.json``; with a variant, the
    name diffusers and transformers write today (``<base>.index.<variant>.json``, e.g.
    ``diffusion_pytorch_model.safetensors.index.fp16.json``), then the legacy one older diffusers wrote and still
    reads (``<base>.<variant>.index.json``)."""
    if not variant:
        return [base + ".index.json"]
    return [add_variant(base + ".index.json", variant), f"{base}.{variant}.index.json"]


def _candidate_names(weights_names: Sequence[str], variant: str | None) -> list[tuple[str, bool]]:
    """(file name, is a shard index) for each accepted weights file, in order of preference."""
    names = []
    for base in weights_names:
        names.append((add_variant(base, variant), False))
        names += [(name, True) for name in index_names(base, variant)]
    return names


def index_shards(index_path: Path) -> list[str]:
    """The shard file names a safetensors index (``*.safetensors.index.json``) lists, sorted, each once."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
    return sorted(set(weight_map.values()))


def resolve_checkpoint(
    path_or_repo: str | os.PathLike | Source,
    subfolder: str | None = None,
    *,
    weights_names: Sequence[str] = (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS),
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> CheckpointFiles:
    """Find ``config.json`` and the safetensors weights of one component.

    Args:
      path_or_repo: a local folder, a hub repo id such as ``stabilityai/stable-video-diffusion-img2vid-xt``, or
        a :class:`Source` (which then carries revision, cache_dir and local_files_only; those arguments are
        not used).
      subfolder: the component's folder inside it (``unet``, ``vae``, ``image_encoder``), or None.
      weights_names: accepted base file names, in order of preference; each may also be sharded
        (``<name>.index.json``) and take the ``variant`` (``diffusion_pytorch_model.fp16.safetensors``; sharded:
        the index ``diffusion_pytorch_model.safetensors.index.fp16.json`` or the legacy
        ``diffusion_pytorch_model.safetensors.fp16.index.json``, see :func:`index_names`).
      variant: e.g. ``"fp16"``. When given, only variant files are accepted (an absent variant is an error,
        not a silent fallback to other weights).
      revision, cache_dir, local_files_only: passed to ``huggingface_hub`` for repo ids.

    Returns:
      CheckpointFiles with the config path and the weight file paths; for a converted folder (Flax layout, it
      has a ``flax_manifest.json``) also the manifest path, and the weights are its ``flax_params.safetensors``.

    A local folder and a hub repo are searched by the same steps; a local one's errors also list what the
    folder holds.
    """
    source = path_or_repo if isinstance(path_or_repo, Source) else Source(
        path_or_repo, revision, cache_dir, local_files_only)
    candidates = _candidate_names(weights_names, variant)
    folder = None
    if source.local is not None:
        folder = source.local / subfolder if subfolder else source.local
        if not folder.is_dir():
            raise CheckpointError(f"{source.local} has no subfolder {subfolder!r}")
        where = str(folder)
    else:
        where = source.src + (f"/{subfolder}" if subfolder else "")

    def file(name: str) -> Path | None:
        return source.file(f"{subfolder}/{name}" if subfolder else name)

    config = file(CONFIG_NAME)
    if config is None:
        if folder is None:
            raise CheckpointError(f"{where}: no {CONFIG_NAME} (offline, or not a component folder)")
        raise CheckpointError(f"{where}: no {CONFIG_NAME}, so neither layout: {_LAYOUTS}; found "
                              f"{sorted(x.name for x in folder.iterdir()) or 'an empty folder'}")
    manifest = file(FLAX_MANIFEST)  # the manifest decides: a converted folder is read as one
    if manifest is not None:
        weights = file(FLAX_WEIGHTS)
        if weights is None:
            if folder is None:
                raise CheckpointError(f"{where}: has {FLAX_MANIFEST} but {FLAX_WEIGHTS} could not be fetched")
            raise CheckpointError(f"{where}: has {FLAX_MANIFEST} but no {FLAX_WEIGHTS} (incomplete copy or "
                                  "conversion?); convert the original weights again with `python -m convert`")
        return CheckpointFiles(config, (weights,), where, manifest)
    for name, is_index in candidates:
        p = file(name)
        if p is None:
            continue
        if not is_index:
            return CheckpointFiles(config, (p,), where)
        shards, missing = [], []
        for s in index_shards(p):
            sp = file(s)
            if sp is None:
                if folder is None:  # stop before fetching the other shards
                    raise CheckpointError(f"{where}: index {name} lists shard {s}, which could not be fetched")
                missing.append(str(folder / s))
            shards.append(sp)
        if missing:
            raise CheckpointError(f"{p} lists shard(s) that are missing: {missing}")
        return CheckpointFiles(config, tuple(shards), where)
    what = f"variant {variant!r} " if variant else ""
    looked = [name for name, _ in candidates]
    if folder is None:
        raise CheckpointError(f"{where}: no {what}safetensors weights; looked for {looked}")
    present = sorted(x.name for x in folder.iterdir() if ".safetensors" in x.name or x.suffix == ".bin")
    hint = ". Pass variant=None to load the default weights" if variant and present else ""
    if FLAX_WEIGHTS in present:
        hint += f". {FLAX_WEIGHTS} without {FLAX_MANIFEST} is an incomplete conversion: convert again"
    raise CheckpointError(
        f"{where}: no {what}safetensors weights; looked for {looked}, found {present or 'none'}{hint} "
        f"(expected {_LAYOUTS})"
    )


def resolve_pipeline_root(
    path_or_repo: str | os.PathLike,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A pipeline's folder: ``path_or_repo`` itself when it is a local folder (``~`` expanded), else the hub
    snapshot of that repo, downloaded with only the files a pipeline reads (``model_index.json``, the configs,
    the indexes, converted folders' manifests and weights, and the default or the ``variant`` safetensors)."""
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_repo), allow_patterns=pipeline_allow_patterns(variant),
                                  revision=revision, cache_dir=cache_dir, local_files_only=local_files_only))


def pipeline_allow_patterns(variant: str | None = None) -> list[str]:
    """The ``allow_patterns`` (fnmatch, as ``huggingface_hub.snapshot_download`` applies them) of the files a
    pipeline reads from a hub repo: ``model_index.json``, the configs, converted folders' manifests and weights,
    and the default or the ``variant`` safetensors with their shard indexes (every name :func:`index_names`
    gives: ``*.safetensors.index.json``; ``*.safetensors.index.fp16.json`` and the legacy
    ``*.safetensors.fp16.index.json``) and shards (``*-00001-of-00002.safetensors``;
    ``*.fp16-00001-of-00002.safetensors`` and the legacy ``*-00001-of-00002.fp16.safetensors``)."""
    patterns = ["model_index.json", f"*/{CONFIG_NAME}", "scheduler/scheduler_config.json",
                "feature_extractor/preprocessor_config.json",
                f"*/{FLAX_MANIFEST}", f"*/{FLAX_WEIGHTS}"]  # converted folders (python -m convert)
    if variant:
        indexes = [f"*/{name}" for name in index_names("*.safetensors", variant)]
        return patterns + indexes + [f"*/*.{variant}.safetensors", f"*/*.{variant}-*.safetensors"]
    return patterns + ["*/*.safetensors.index.json", f"*/{TRANSFORMERS_WEIGHTS}", f"*/{DIFFUSERS_WEIGHTS}",
                       "*/*-of-*.safetensors"]
