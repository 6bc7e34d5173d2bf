"""Fine-tuning SVD in JAX.

* ``loss``: the EDM v-objective (:func:`denoising_loss`);
* ``config``: the run's settings (:class:`TrainConfig`);
* ``step``: the jitted train step (conditioning draws, loss, optax update, remat, FSDP) and its state;
* ``data``: video clips from a folder or a JSONL manifest, prefetched;
* ``checkpoint``: resumable orbax checkpoints of the whole state;
* ``export``: the trained UNet as a diffusers pipeline folder;
* ``trainer``: :func:`train`, the loop ``svd-jax train`` runs.
"""

from .checkpoint import CheckpointError, TrainCheckpointer
from .config import TrainConfig, TrainConfigError
from .data import ClipLoader, DataError, VideoClipDataset
from .export import export_pipeline, export_unet
from .loss import denoising_loss, edm_preconditioning
from .step import TrainState, TrainStep, make_optimizer
from .trainer import TrainResult, train

__all__ = ["CheckpointError", "ClipLoader", "DataError", "TrainCheckpointer", "TrainConfig", "TrainConfigError",
           "TrainResult", "TrainState", "TrainStep", "VideoClipDataset", "denoising_loss", "edm_preconditioning",
           "export_pipeline", "export_unet", "make_optimizer", "train"]
