"""The settings of a fine-tuning run: :class:`TrainConfig` (what the train step computes) and its checks.

Everything here is plain data (frozen, hashable): the train step is jitted once per config, and
:meth:`TrainConfig.fingerprint` is stored with every checkpoint, so a resumed run is refused when a setting that
changes the numbers differs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from ..lora import DEFAULT_TARGETS
from ..options import REMAT_POLICIES

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "cosine")
TRAINABLE = ("full", "temporal", "lora")
# The temporal layers of the SVD UNet, by the diffusers parameter names they appear in: temporal residual
# blocks, temporal transformer blocks, the spatial/temporal mixers and the frame-position embeddings.
TEMPORAL_MARKERS = ("temporal_res_block", "temporal_transformer_blocks", "time_mixer", "time_pos_embed")


class TrainConfigError(ValueError):
    """A training setting out of range; the message names it and what is accepted."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the train step (svd_jax/training/step.py). Defaults follow public SVD fine-tuning.

    Clip shape: ``num_frames`` frames of ``height`` x ``width`` pixels (multiples of the VAE's factor 8),
    ``batch_size`` clips per step over all devices and processes.

    Optimiser: ``optimizer`` (``"adamw"``: optax.adamw with ``adam_b1/b2/eps`` and decoupled ``weight_decay``,
    as torch.optim.AdamW; ``"adafactor"``: factored second moments, the low-memory choice, with
    ``weight_decay`` and an absolute learning rate), ``learning_rate`` after a linear warmup of ``warmup_steps``
    optimizer updates (update u < warmup uses lr * (u + 1) / warmup), then ``schedule`` ``"constant"`` or
    ``"cosine"`` (down to ``min_learning_rate`` at ``decay_steps`` updates, default: all of ``max_steps``);
    ``max_grad_norm`` global-norm clipping (None: off); ``grad_accum_steps`` micro-batches averaged per update
    (optax.MultiSteps; a step below is one micro-batch); ``ema_decay``: an exponential moving average of the
    trained weights, updated after every optimizer update (None: none).

    What trains: ``trainable`` ``"full"``, ``"temporal"`` (TEMPORAL_MARKERS) or a predicate on the diffusers
    parameter name (``"down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight" -> bool``).
    The other parameters get no gradient and no optimizer state. ``"lora"``: a new LoRA adapter of rank
    ``lora_rank`` and ``lora_alpha`` (None: the rank, so alpha / r = 1) on the linear layers peft's
    ``target_modules=lora_targets`` names (default: every attention's to_q, to_k, to_v, to_out.0) trains, A
    initialised as peft does (uniform, +-1/sqrt(in)) and B at zero; the whole UNet is frozen.

    Memory: ``remat`` (svd_jax/options.py REMAT_POLICIES); ``dtype`` of the compute (``"auto"``: bfloat16 on
    TPU/GPU, float32 on CPU); weights, gradients and optimizer state stay float32.

    Objective (the issue's; svd_jax/training/loss.py): ``ln sigma ~ N(p_mean, p_std)``; the conditioning frame's
    noise ``ln noise_aug_strength ~ N(noise_aug_mean, noise_aug_std)``; conditioning dropout with one uniform r per
    clip: the CLIP embedding zeroed when r < drop_embedding, the image latents when
    drop_embedding - drop_both <= r < drop_embedding - drop_both + drop_image (so both with probability
    drop_both). ``seed`` fixes every random draw (data order, clips, noise).
    """

    num_frames: int = 14
    height: int = 320
    width: int = 576
    batch_size: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None
    min_learning_rate: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    ema_decay: float | None = None
    trainable: str | Callable[[str], bool] = "full"
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    remat: str = "none"
    dtype: str = "auto"
    p_mean: float = 0.7
    p_std: float = 1.6
    noise_aug_mean: float = -3.0
    noise_aug_std: float = 0.5
    drop_embedding: float = 0.2
    drop_image: float = 0.2
    drop_both: float = 0.1
    seed: int = 0

    def __post_init__(self):
        self.check()

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (checked)."""
        return dataclasses.replace(self, **changes)

    def check(self, vae_factor: int = 8) -> None:
        """Raise :class:`TrainConfigError` naming the first bad setting."""
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainConfigError(f"{name} must be a positive int, not {v!r}")

        for name in ("num_frames", "height", "width", "batch_size", "max_steps", "grad_accum_steps", "lora_rank"):
            positive_int(name)
        for name in ("height", "width"):
            if getattr(self, name) % vae_factor:
                v = getattr(self, name)
                raise TrainConfigError(f"{name}={v} is not a multiple of the VAE's factor {vae_factor} "
                                       f"(e.g. {max(vae_factor, v // vae_factor * vae_factor)})")
        if self.warmup_steps < 0 or self.decay_steps is not None and self.decay_steps < 1:
            raise TrainConfigError(f"warmup_steps must be >= 0 and decay_steps None or >= 1; got "
                                   f"{self.warmup_steps}, {self.decay_steps}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise TrainConfigError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if not callable(self.trainable) and self.trainable not in TRAINABLE:
            raise TrainConfigError(f"trainable must be one of {TRAINABLE} or a predicate on parameter names, "
                                   f"not {self.trainable!r}")
        if isinstance(self.lora_targets, str) or not self.lora_targets or \
                not all(isinstance(t, str) and t for t in self.lora_targets):
            raise TrainConfigError(f"lora_targets must be a tuple of module names such as {DEFAULT_TARGETS}, not "
                                   f"{self.lora_targets!r}")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise TrainConfigError(f"lora_alpha must be a positive number or None (= lora_rank), not "
                                   f"{self.lora_alpha!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise TrainConfigError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', not {self.dtype!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainConfigError(f"learning_rate must be a positive number, not {self.learning_rate!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainConfigError(f"max_grad_norm must be > 0 or None, not {self.max_grad_norm!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise TrainConfigError(f"ema_decay must be in (0, 1) or None, not {self.ema_decay!r}")
        if self.p_std <= 0 or self.noise_aug_std < 0:
            raise TrainConfigError(f"p_std must be > 0 and noise_aug_std >= 0; got {self.p_std}, "
                                   f"{self.noise_aug_std}")
        e, i, b = self.drop_embedding, self.drop_image, self.drop_both
        if not (0 <= b <= min(e, i) and e + i - b <= 1):
            raise TrainConfigError(
                f"dropout probabilities need 0 <= drop_both <= min(drop_embedding, drop_image) and "
                f"drop_embedding + drop_image - drop_both <= 1; got {e}, {i}, {b}")

    @property
    def updates(self) -> int:
        """Optimizer updates in ``max_steps`` micro-batch steps."""
        return max(1, self.max_steps // self.grad_accum_steps)

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with its checkpoint (JSON-able): everything that changes the
        numbers of the steps already taken. ``max_steps`` is left out so a run can be extended, except where the
        cosine schedule's length depends on it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if callable(self.trainable):
            out["trainable"] = getattr(self.trainable, "__name__", "custom predicate")
        out.pop("max_steps")
        out["lora_targets"] = list(self.lora_targets)  # as JSON reads it back
        if self.trainable != "lora":  # the adapter's shape does not matter to other runs
            for name in ("lora_rank", "lora_alpha", "lora_targets"):
                out.pop(name)
        if self.schedule == "cosine":
            out["decay_steps"] = self.decay_steps or self.updates
        return out
