"""Frozen, hashable option objects: what changes how the models compute, and the generation's static config.

:class:`ModelOptions` reaches every module that needs it as a field (``options=``): the attention backend and
its block sizes, the feed-forward slicing budget, and the two partitioner hooks (activation constraints at block
boundaries, convolution-kernel pinning). The models read nothing else: no context variables, no module constants
patched at trace time. :class:`GenerationConfig` (svd_jax/pipeline/inputs.py) holds a ``ModelOptions`` and is the
jit static key of a whole generation.

Both are hashable (they sit in Flax module fields and jit static arguments): equal options give the same program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

ATTENTION_BACKENDS = ("auto", "xla", "blockwise", "cudnn", "pallas")
# Rematerialisation (jax.checkpoint) of the UNet for training: what the backward pass recomputes instead of keeping.
# A policy is "none" or a "+"-joined set of granularities, nested where several apply:
#   blocks: keep only each down/mid/up block's inputs, recompute the block;
#   transformers: keep only each transformer block's input, recompute its attention and feed-forward activations
#     (the largest at the high-resolution levels);
#   layers: every GroupNorm/LayerNorm and every feed-forward (slice) keeps only its input: the float32 statistics
#     and centred copies of a norm and the 4x-wide GEGLU hidden layers are recomputed (cheap: elementwise, or one
#     feed-forward forward).
# "blocks+layers" / "blocks+transformers+layers" hold the least memory (a block's recomputation then keeps only its
# layers' inputs); "none" is the fastest.
REMAT_PARTS = ("blocks", "transformers", "layers")
REMAT_POLICIES = ("none", "blocks", "transformers", "layers", "blocks+transformers", "blocks+layers",
                  "transformers+layers", "blocks+transformers+layers")
# the samplers a pipeline runs by name (svd_jax/samplers.py; here so the CLI can list them without jax)
SCHEDULER_NAMES = ("euler", "edm_euler", "edm_dpmsolver++")
MiB = 2**20


def check_byte_budget(name: str, value: int | None, allow_none: bool = True, minimum: int = 1) -> int | None:
    """``value`` if it is an int >= ``minimum`` (or None where allowed), else ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = ("a positive" if minimum == 1 else f"an int >= {minimum},") + " number of bytes"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the networks compute (never what: every setting gives the same numbers up to float summation order).

    Fields:
      attention: backend of every attention call (``ATTENTION_BACKENDS``; svd_jax/models/attention.py).
      attention_q_block, attention_k_block: token block sizes of the ``blockwise`` backend.
      attention_auto_bytes: under ``auto``, calls whose float32 scores exceed this many bytes leave the plain
        formula (for Pallas on one TPU, else blockwise).
      forward_chunk_bytes: feed-forwards whose float32 hidden layer exceeds this run over row slices (None:
        never); off in a partitioned program, where the devices already split the rows.
      partitioned: the program is partitioned over a device mesh: no single-device kernels (Pallas), no
        row slicing of feed-forwards.
      constrain: ``(N, h, w, C) -> same``, applied to activations at block boundaries (the partitioner's
        sharding constraint), or None.
      conv_kernel_hook: ``kernel -> kernel``, applied to every convolution kernel before use (the partitioner
        pins kernels replicated), or None.
      remat: what the UNet's backward pass recomputes (``REMAT_POLICIES``); forward results are identical.
      platform: the backend the program is built for (``"cpu"``, ``"gpu"``, ``"tpu"``); None: jax's default
        backend at trace time. Decides the backend-specific paths (cuDNN, Pallas, the XLA:CPU workarounds of
        svd_jax/models/xla_ops.py).
    """

    attention: str = "auto"
    attention_q_block: int = 1024
    attention_k_block: int = 1024
    attention_auto_bytes: int = 256 * MiB
    forward_chunk_bytes: int | None = 256 * MiB
    partitioned: bool = False
    constrain: Callable | None = None
    conv_kernel_hook: Callable | None = None
    remat: str = "none"
    platform: str | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}; got {self.attention!r}")
        for name in ("attention_q_block", "attention_k_block", "attention_auto_bytes"):
            check_byte_budget(name, getattr(self, name), allow_none=False)
        check_byte_budget("forward_chunk_bytes: the forward chunk budget", self.forward_chunk_bytes)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}; got {self.remat!r}")
        if self.platform not in (None, "cpu", "gpu", "tpu"):
            raise ValueError(f"platform must be None, 'cpu', 'gpu' or 'tpu'; got {self.platform!r}")

    def remats(self, part: str) -> bool:
        """Whether the remat policy includes granularity ``part`` (one of ``REMAT_PARTS``)."""
        if part not in REMAT_PARTS:
            raise ValueError(f"unknown remat granularity {part!r}; one of {REMAT_PARTS}")
        return part in self.remat.split("+")

    def replace(self, **changes) -> ModelOptions:
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        return dataclasses.replace(self, **changes)

    def backend(self) -> str:
        """``platform``, or jax's default backend when it is None."""
        if self.platform is not None:
            return self.platform
        import jax

        return jax.default_backend()

    def constrain_activations(self, x):
        """``constrain(x)``, or x unchanged without a partitioner."""
        return x if self.constrain is None else self.constrain(x)


DEFAULT_OPTIONS = ModelOptions()


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The static configuration of one generation program: its jit key. Equal configs (with equal input and
    parameter shapes) run the same compiled program; every field changes the program.

    Fields:
      cfg: classifier-free guidance on (the UNet sees [uncond; cond] halves).
      decode_chunk_size: frames decoded at once within a video.
      latent_output: return the final latents instead of decoded frames.
      dtype: the compute dtype's name.
      prediction_type: the scheduler's (``"v_prediction"`` for SVD).
      clip_mean, clip_std: the CLIP image normalisation.
      stream_decode_bytes: on one device, decode chunks whose full-resolution activations exceed this many bytes
        are decoded streamed (svd_jax/models/vae.py ``decode_streamed``); None: never.
      model: the :class:`ModelOptions` the three networks run with (a partitioner's hooks included).
      partitioner: the :class:`~svd_jax.sharding.Partitioner` of a sharded program, or None (one device).
      sampler: how a step updates the latents: ``"euler"`` (svd_jax/scheduler.py ``step``; the Euler and EDM
        Euler schedulers) or ``"multistep"`` (DPM-Solver++, svd_jax/samplers.py, its history in the carry).
      callback_steps: every this many steps (and after the last) the program hands the latents to the host
        (``io_callback``, svd_jax/pipeline/stages.py ``host_callback``); None: no host callback (the program
        can then be kept in the persistent compile cache).
      deep_cache: step caching (DeepCache) as (interval N, branch b): every N-th step runs the whole UNet, the
        others only its b shallowest levels on the deep features kept from the last full step; None: off.
    """

    cfg: bool
    decode_chunk_size: int
    latent_output: bool
    dtype: str
    prediction_type: str
    clip_mean: tuple
    clip_std: tuple
    stream_decode_bytes: int | None
    model: ModelOptions
    partitioner: object | None = None
    sampler: str = "euler"
    callback_steps: int | None = None
    deep_cache: tuple[int, int] | None = None

    @property
    def data_size(self) -> int:
        """Device groups the program's data axis splits videos (and CFG halves) over; 1 without a mesh."""
        return 1 if self.partitioner is None else self.partitioner.data_size

    @property
    def sequential_cfg(self) -> bool:
        """The two CFG halves run one after the other (half the UNet's activations), unless a data axis splits
        them over devices."""
        return self.data_size == 1
