"""Diffusers/transformers safetensors checkpoints -> Flax parameter trees, and the converted Flax layout.

One module per job, each usable on its own (every public name is re-exported here):

* :mod:`.errors`: :class:`CheckpointError`, raised for every problem with a checkpoint.
* :mod:`.locate`: finding files, in a local folder or a hub repo (:class:`Source`, :func:`resolve_checkpoint`
  for one component, :func:`resolve_pipeline_root` for a pipeline).
* :mod:`.safetensors_io`: reading (checked headers, memory-mapped or into aligned buffers) and streaming out
  safetensors files; :func:`locate_tensors` merges the shards of one checkpoint.
* :mod:`.torch_layout`: PyTorch names and layouts <-> Flax paths (:func:`plan_conversion`, :func:`load_params`,
  and back: :func:`params_to_torch_state`).
* :mod:`.flax_layout`: the layout ``python -m convert`` writes (:func:`read_flax_manifest`,
  :func:`load_flax_params`, :func:`model_key`).
* :mod:`.pretrained`: :class:`PretrainedMixin` (``from_pretrained``) and the models' config helpers.
"""

from .errors import CheckpointError
from .flax_layout import (
    FLAX_DTYPES,
    FLAX_FORMAT,
    FLAX_FORMAT_VERSION,
    FLAX_MANIFEST,
    FLAX_WEIGHTS,
    load_flax_params,
    model_key,
    read_flax_manifest,
    tensors_digest,
)
from .locate import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    CheckpointFiles,
    Source,
    add_variant,
    index_shards,
    looks_like_local_path,
    resolve_checkpoint,
    resolve_pipeline_root,
)
from .pretrained import PretrainedMixin, check_class_name, config_fields
from .safetensors_io import (
    TensorInfo,
    locate_tensors,
    read_checkpoint,
    read_safetensors,
    read_safetensors_header,
    read_tensor,
    write_safetensors,
)
from .torch_layout import (
    LEGACY_ATTENTION_NAMES,
    TRANSFORMS,
    ConversionPlan,
    FlaxPath,
    Transform,
    flatten_shapes,
    load_params,
    params_to_torch_state,
    path_to_torch_name,
    plan_conversion,
    torch_name_to_path,
)

__all__ = [
    "CONFIG_NAME",
    "DIFFUSERS_WEIGHTS",
    "FLAX_DTYPES",
    "FLAX_FORMAT",
    "FLAX_FORMAT_VERSION",
    "FLAX_MANIFEST",
    "FLAX_WEIGHTS",
    "LEGACY_ATTENTION_NAMES",
    "TRANSFORMERS_WEIGHTS",
    "TRANSFORMS",
    "CheckpointError",
    "CheckpointFiles",
    "ConversionPlan",
    "FlaxPath",
    "PretrainedMixin",
    "Source",
    "TensorInfo",
    "Transform",
    "add_variant",
    "check_class_name",
    "config_fields",
    "flatten_shapes",
    "index_shards",
    "load_flax_params",
    "load_params",
    "locate_tensors",
    "looks_like_local_path",
    "model_key",
    "params_to_torch_state",
    "path_to_torch_name",
    "plan_conversion",
    "read_checkpoint",
    "read_flax_manifest",
    "read_safetensors",
    "read_safetensors_header",
    "read_tensor",
    "resolve_checkpoint",
    "resolve_pipeline_root",
    "tensors_digest",
    "torch_name_to_path",
    "write_safetensors",
]
