"""The fine-tuning step: conditioning drawn as in SVD training, the EDM v-loss, an optax update, one jitted program.

* Parameters live flat (``{"down_blocks_0.resnets_0.spatial_res_block.conv1.kernel": array}``), split into the
  trained ones (``TrainState.params``, with gradients, optimizer state and the optional EMA) and the frozen rest
  (``TrainState.frozen``): a frozen parameter never gets a gradient buffer or optimizer state.
* ``trainable="lora"``: ``TrainState.params`` is a new adapter (``"<module>.lora_A"`` (r, in), ``".lora_B"`` (out, r)
  per targeted linear layer, float32), the whole UNet frozen, in the compute dtype; the loss adds
  ``(alpha / r) * B @ A`` to each targeted kernel inside the program (:func:`svd_jax.lora.fuse`, in float32), so
  the gradients reach A and B only.
* Weights, gradients and optimizer state are float32 (the master copy); the UNet computes in the config's
  ``dtype`` (bfloat16 on TPU/GPU by default): its layers cast the float32 weights where they use them.
* A batch is pixels (``{"pixels": (B, F, H, W, 3) in [-1, 1], "fps": (B,), "motion_bucket_id": (B,)}``), whose
  latents the step encodes with the VAE (forward only), or pre-encoded (``"latents"`` (B, F, h, w, C) scaled,
  ``"first_frame"`` (B, H, W, 3), ``"image_embeds"`` (B, 1, D)), which leaves the VAE encoder only the
  noise-augmented first frame and skips CLIP.
* Every random draw of step s comes from ``fold_in(state.rng, s)``: the numbers of a step depend only on the seed,
  the step and the batch, so a resumed run repeats an uninterrupted one bit for bit.
* On a mesh (:class:`~svd_jax.sharding.Partitioner`), clips are split over ``data`` (and a clip's height over
  ``space``), and the trained weights, their optimizer state and the frozen weights are FSDP-split over all
  devices; XLA gathers weights where they are used and reduce-scatters gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ..pipeline import stages
from ..preprocessing import CLIP_MEAN, CLIP_STD
from ..sharding import DATA, Partitioner
from ..weights import path_to_torch_name
from .config import TEMPORAL_MARKERS, TrainConfig, TrainConfigError
from .loss import denoising_loss

SEP = "."


def flatten_params(params: Mapping) -> dict[str, Any]:
    """Nested Flax params -> ``{"a.b.kernel": leaf}`` (the layout of ``TrainState.params`` / ``.frozen``)."""
    return {SEP.join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten_params`."""
    return traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def diffusers_name(key: str, ndim: int) -> str:
    """A flat key -> the diffusers parameter name it converts from (``"...conv1.weight"``)."""
    return path_to_torch_name(tuple(key.split(SEP)), ndim)[0]


LORA_A, LORA_B = ".lora_A", ".lora_B"  # TrainState.params keys of a LoRA run: "<diffusers module>.lora_A"
LORA_INIT = 0x4C6F5241  # folded into the run's key for the adapter's initial A (steps fold in their numbers)


def trainable_keys(flat_params: Mapping[str, Any], trainable: str | Callable[[str], bool]) -> list[str]:
    """The keys of ``flat_params`` that train: all (``"full"``), the temporal layers (``"temporal"``), or those
    whose diffusers name satisfies the predicate; none for ``"lora"`` (a new adapter trains). An empty selection
    is an error."""
    if trainable == "lora":
        return []
    if trainable == "full":
        keys = list(flat_params)
    else:
        pred = (lambda n: any(m in n for m in TEMPORAL_MARKERS)) if trainable == "temporal" else trainable
        keys = [k for k, v in flat_params.items() if pred(diffusers_name(k, np.ndim(v)))]
    if not keys:
        raise TrainConfigError(f"trainable={trainable!r} selects no parameter of the UNet")
    return sorted(keys)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes (a pytree; checkpointed whole).

    step: () int32, micro-batch steps taken; params: the trained weights (flat, float32); frozen: the other
    weights (flat); opt_state: the optax state of ``params``; ema: the moving average of ``params`` or None;
    rng: (2,) uint32, the run's base key (each step folds its number in).
    """

    step: jax.Array
    params: dict
    frozen: dict
    opt_state: Any
    ema: dict | None
    rng: jax.Array


def learning_rate_schedule(config: TrainConfig) -> Callable:
    """Optimizer update count -> learning rate: linear warmup, then constant or cosine (TrainConfig)."""
    peak, warmup = config.learning_rate, config.warmup_steps
    decay = config.decay_steps or config.updates
    floor = config.min_learning_rate

    def schedule(count):
        u = jnp.asarray(count, jnp.float32)
        lr = jnp.asarray(peak, jnp.float32)
        if config.schedule == "cosine":
            frac = jnp.clip((u - warmup) / max(decay - warmup, 1), 0.0, 1.0)
            lr = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        if warmup:
            lr = lr * jnp.minimum(1.0, (u + 1.0) / warmup)
        return lr

    return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipping + AdamW/Adafactor on the schedule, wrapped in optax.MultiSteps for gradient accumulation."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                          weight_decay=config.weight_decay)
    else:  # factored second moments; an absolute learning rate, so both optimizers read lr the same way
        opt = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                              weight_decay_rate=config.weight_decay or None)
    if config.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), opt)
    if config.grad_accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=config.grad_accum_steps)
    return opt


def compute_dtype(config: TrainConfig, platform: str | None = None):
    """The config's compute dtype (``"auto"``: bfloat16 on TPU/GPU, float32 on CPU)."""
    if config.dtype != "auto":
        return jnp.dtype(config.dtype)
    platform = platform or jax.default_backend()
    return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)


def _per_clip(x):
    return x[:, None, None, None]


class TrainStep:
    """The jitted train step of one UNet (+ the VAE and CLIP encoder, forward only) under one config.

    ``step = TrainStep(unet, vae, image_encoder, config, partitioner=None)``;
    ``state = step.init(unet_params)``; ``state, metrics = step(state, batch, encoder_params)`` with
    ``encoder_params = {"vae": ..., "image_encoder": ...}`` (any dtype; unchanged) and ``batch`` as in the module
    docstring. ``metrics``: ``loss`` (the objective before the update), ``grad_norm`` (global, before
    clipping) and ``learning_rate`` of the update, scalars. The state's buffers are donated.
    """

    def __init__(self, unet, vae, image_encoder, config: TrainConfig, partitioner: Partitioner | None = None,
                 clip_mean=CLIP_MEAN, clip_std=CLIP_STD):
        config.check(getattr(vae, "downscale", 8))  # vae / image_encoder may be None for pre-encoded batches
        self.config, self.partitioner = config, partitioner
        platform = None if partitioner is None else partitioner.mesh.devices.flat[0].platform
        self.dtype = compute_dtype(config, platform)
        options = unet.options.replace(remat=config.remat)
        if partitioner is not None:
            options = partitioner.model_options(options)
        self.unet = unet.clone(dtype=self.dtype, options=options)
        enc_options = options.replace(remat="none")
        self.vae = None if vae is None else stages.with_options(vae, enc_options)
        self.image_encoder = None if image_encoder is None else stages.with_options(image_encoder, enc_options)
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.lora = config.trainable == "lora"
        self.lora_modules: list[str] = []  # the adapted layers of a LoRA run (set by init / abstract_state)
        self.tx = make_optimizer(config)
        self.schedule = learning_rate_schedule(config)
        self._jitted = {}

    # state ------------------------------------------------------------------------------------------------------
    def init(self, unet_params, rng: jax.Array | None = None) -> TrainState:
        """A fresh state from the UNet's parameters (copied as float32; on the mesh's shardings with a
        partitioner). rng: a (2,) uint32 key; default ``PRNGKey(config.seed)``."""
        build = self._builder(unet_params)
        shardings = self.state_shardings(self.abstract_state(unet_params))
        rng = jax.random.PRNGKey(self.config.seed) if rng is None else rng
        if shardings is None:  # committed to the default device, like a state restored from a checkpoint, so
            # that a fresh and a resumed run trace the same program (and share its persistent-cache entry)
            shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.jit(build, out_shardings=shardings)(flatten_params(unet_params), rng)

    def abstract_state(self, unet_params) -> TrainState:
        """The state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), from params or their abstract shapes."""
        flat = flatten_params(unet_params)
        shapes = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for k, v in flat.items()}
        return jax.eval_shape(self._builder(unet_params), shapes, jax.ShapeDtypeStruct((2,), jnp.uint32))

    def _builder(self, unet_params):
        """(flat params, rng) -> a fresh TrainState (traceable): the trained / frozen split, the optimizer state,
        the EMA; for LoRA the new adapter (peft's initialisation: A uniform in +-1/sqrt(in), B zero)."""
        flat = flatten_params(unet_params)
        keys = set(trainable_keys(flat, self.config.trainable))
        if self.lora:
            from ..lora import linear_modules, target_modules

            self.lora_modules = target_modules(unet_params, self.config.lora_targets)
            shapes = linear_modules(unet_params)
        r = self.config.lora_rank

        # A LoRA run's base is never updated and the layers use it in the compute dtype: keep it in that dtype
        # (half the bytes on TPU/GPU; float32 on CPU). Full/temporal runs keep frozen weights float32, since they
        # are exported as they are; a LoRA run exports its adapter, fused only into the original base weights.
        frozen_dtype = self.dtype if self.lora else jnp.float32

        def build(flat, rng):
            params = {k: v.astype(jnp.float32) for k, v in flat.items() if k in keys}
            frozen = {k: v.astype(frozen_dtype) for k, v in flat.items() if k not in keys}
            if self.lora:
                init = jax.random.split(jax.random.fold_in(rng, LORA_INIT), len(self.lora_modules))
                for m, key in zip(self.lora_modules, init):
                    fan_in, fan_out = shapes[m]
                    bound = 1.0 / np.sqrt(fan_in)
                    params[m + LORA_A] = jax.random.uniform(key, (r, fan_in), jnp.float32, -bound, bound)
                    params[m + LORA_B] = jnp.zeros((fan_out, r), jnp.float32)
            ema = None if self.config.ema_decay is None else dict(params)
            return TrainState(jnp.zeros((), jnp.int32), params, frozen, self.tx.init(params), ema, rng)

        return build

    def state_shardings(self, abstract: TrainState):
        """A pytree of shardings like the state (None without a partitioner): weights, their optimizer state and
        EMA FSDP-split by shape; the step counter and key replicated."""
        part = self.partitioner
        if part is None:
            return None
        by_shape = lambda t: jax.tree.map(lambda x: part.param_sharding(x.shape), t)
        rep = part.sharding(P())
        return TrainState(rep, by_shape(abstract.params), by_shape(abstract.frozen), by_shape(abstract.opt_state),
                          None if abstract.ema is None else by_shape(abstract.ema), rep)

    # batches ----------------------------------------------------------------------------------------------------
    def batch_sharding(self, batch_shapes: Mapping[str, tuple]):
        """Shardings of a batch's arrays: clips over ``data`` (a clip's height over ``space`` where it divides)."""
        part = self.partitioner
        if part is None:
            return None
        out = {}
        for k, shape in batch_shapes.items():
            spec = {5: part.video_spec(), 4: P(DATA, part.video_spec()[2], None, None)}.get(len(shape), P(DATA))
            out[k] = part.input_sharding(spec, shape)
        return out

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise ValueError unless ``batch`` has the config's clip shape (one of the two batch forms)."""
        c = self.config
        f = getattr(self.vae, "downscale", 8)
        b = np.shape(batch.get("fps", ()))[:1]
        want = {"fps": b, "motion_bucket_id": b}
        if "latents" in batch:
            lat_c = self.unet.out_channels
            want.update(latents=b + (c.num_frames, c.height // f, c.width // f, lat_c),
                        first_frame=b + (c.height, c.width, 3))
            if "image_embeds" in batch:
                want["image_embeds"] = b + (1, np.shape(batch["image_embeds"])[-1])
        else:
            want["pixels"] = b + (c.num_frames, c.height, c.width, 3)
        missing = sorted(set(want) - set(batch))
        if missing:
            raise ValueError(f"batch is missing {missing}; a batch has pixels, fps, motion_bucket_id (or latents, "
                             f"first_frame, image_embeds instead of pixels)")
        for k, shape in want.items():
            if tuple(np.shape(batch[k])) != tuple(shape):
                raise ValueError(f"batch[{k!r}] has shape {tuple(np.shape(batch[k]))}; this run expects {shape} "
                                 f"(num_frames={c.num_frames}, height={c.height}, width={c.width})")

    # the step ---------------------------------------------------------------------------------------------------
    def encode_latents(self, pixels, encoder_params):
        """pixels (B, F, H, W, 3) in [-1, 1] -> x0 (B, F, h, w, C) float32: every frame's VAE posterior mode,
        times the VAE's scaling_factor (the pipeline's latents)."""
        vae = self.vae
        frames = pixels.reshape((-1,) + pixels.shape[2:])
        z = stages.image_latents(vae, encoder_params["vae"], frames, jnp.zeros_like(frames), 0.0, jnp.float32)
        return z.reshape(pixels.shape[:2] + z.shape[1:]) * vae.scaling_factor

    def embed(self, first, encoder_params):
        """first frames (B, H, W, 3) in [-1, 1] -> CLIP image embeddings (B, 1, D) float32, through the
        pipeline's own resize and normalisation."""
        emb = stages.image_embeddings(self.image_encoder, encoder_params["image_encoder"], (first + 1.0) / 2.0,
                                      self.clip_mean, self.clip_std, self.dtype)
        return emb[:, None, :].astype(jnp.float32)

    def conditioning(self, key, batch, encoder_params):
        """One step's random draws and conditioning -> (the arguments of :func:`denoising_loss` less the UNet,
        the other draws).

        key: the step's key. The first dict: x0 (B, F, h, w, C), image_latents (B, h, w, C'), image_embeds
        (B, 1, D), added_time_ids (B, 3), sigma (B,), noise like x0. The second: aug_noise (B, H, W, 3), the
        first frame's pixel noise (times added_time_ids[:, 2]); keep_embedding, keep_image (B,) 1.0 or 0.0.
        """
        c = self.config
        k_sigma, k_noise, k_aug, k_aug_noise, k_drop = jax.random.split(key, 5)
        first = batch["first_frame"] if "latents" in batch else batch["pixels"][:, 0]
        b = first.shape[0]
        vae, vae_params = self.vae, encoder_params["vae"]
        x0 = (jnp.asarray(batch["latents"], jnp.float32) if "latents" in batch
              else self.encode_latents(batch["pixels"], encoder_params))
        x0 = jax.lax.stop_gradient(x0)
        noise_aug = jnp.exp(c.noise_aug_mean + c.noise_aug_std * jax.random.normal(k_aug, (b,), jnp.float32))
        aug_noise = jax.random.normal(k_aug_noise, first.shape, jnp.float32)
        z_img = stages.image_latents(vae, vae_params, first, aug_noise, _per_clip(noise_aug), jnp.float32)
        emb = (jnp.asarray(batch["image_embeds"], jnp.float32) if "image_embeds" in batch
               else self.embed(first, encoder_params))
        r = jax.random.uniform(k_drop, (b,))
        lo = c.drop_embedding - c.drop_both
        keep_emb = (r >= c.drop_embedding).astype(jnp.float32)
        keep_img = ((r < lo) | (r >= lo + c.drop_image)).astype(jnp.float32)
        sigma = jnp.exp(c.p_mean + c.p_std * jax.random.normal(k_sigma, (b,), jnp.float32))
        ids = jnp.stack([batch["fps"].astype(jnp.float32) - 1.0, batch["motion_bucket_id"].astype(jnp.float32),
                         noise_aug], axis=1)
        cond = dict(x0=x0, image_latents=jax.lax.stop_gradient(z_img) * _per_clip(keep_img),
                    image_embeds=jax.lax.stop_gradient(emb) * keep_emb[:, None, None], added_time_ids=ids,
                    sigma=sigma, noise=jax.random.normal(k_noise, x0.shape, jnp.float32))
        return cond, dict(aug_noise=aug_noise, keep_embedding=keep_emb, keep_image=keep_img)

    def loss(self, params, frozen, cond):
        """The objective of one batch's conditioning for trained ``params`` and ``frozen`` (flat): a scalar."""
        return denoising_loss(self.unet, self._unet_params(params, frozen), **cond)

    def _unet_params(self, params, frozen) -> dict:
        """The UNet's nested params: trained and frozen together, or (LoRA) the frozen UNet with the adapter
        fused into its targeted kernels."""
        if not self.lora:
            return unflatten_params({**frozen, **params})
        from ..lora import fuse

        return fuse(unflatten_params(frozen), [self._factors(params)])

    def _factors(self, params) -> dict:
        """A LoRA run's trained params as :func:`svd_jax.lora.factors` (the config's constant alpha / r)."""
        modules = sorted(k[: -len(LORA_A)] for k in params if k.endswith(LORA_A))
        scaling = self.lora_alpha / self.config.lora_rank
        return {"A": {m: params[m + LORA_A] for m in modules}, "B": {m: params[m + LORA_B] for m in modules},
                "scale": {m: jnp.float32(scaling) for m in modules}}

    @property
    def lora_alpha(self) -> float:
        """The adapter's lora_alpha (the config's, or the rank)."""
        return float(self.config.lora_alpha if self.config.lora_alpha is not None else self.config.lora_rank)

    def trained_lora(self, state: TrainState, ema: bool = False):
        """A LoRA run's adapter (the EMA weights with ``ema=True``) as a :class:`svd_jax.lora.LoRA` on the host,
        for :func:`svd_jax.lora.save_lora`."""
        from ..lora import LoRA

        if not self.lora:
            raise ValueError(f"trainable={self.config.trainable!r}: this run trains no LoRA adapter")
        if ema and state.ema is None:
            raise ValueError("this run keeps no EMA (TrainConfig.ema_decay is None)")
        p = jax.device_get(state.ema if ema else state.params)
        modules = sorted(k[: -len(LORA_A)] for k in p if k.endswith(LORA_A))
        return LoRA({m: (np.asarray(p[m + LORA_A], np.float32), np.asarray(p[m + LORA_B], np.float32))
                     for m in modules}, dict.fromkeys(modules, self.lora_alpha))

    def update(self, state: TrainState, grads) -> TrainState:
        """Apply one micro-batch's gradients (flat, like ``state.params``): the optimizer (clipping, accumulation),
        the EMA (on the micro-steps that update), the step counter."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            updated = (self.tx.has_updated(opt_state) if self.config.grad_accum_steps > 1
                       else jnp.bool_(True))
            d = jnp.where(updated, jnp.float32(self.config.ema_decay), jnp.float32(1.0))
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return TrainState(state.step + 1, params, state.frozen, opt_state, ema, state.rng)

    def _step(self, state: TrainState, batch, encoder_params):
        key = jax.random.fold_in(state.rng, state.step)
        cond, _ = self.conditioning(key, batch, encoder_params)
        loss, grads = jax.value_and_grad(self.loss)(state.params, state.frozen, cond)
        # the update this micro-step contributes to (MultiSteps applies it on the last of its k micro-steps)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "learning_rate": self.schedule(state.step // self.config.grad_accum_steps)}
        return self.update(state, grads), metrics

    def jitted(self, state: TrainState, batch, encoder_params):
        """The jitted step for these arguments' layout (one per batch form), donating the state."""
        key = tuple(sorted(batch))
        if key not in self._jitted:
            kw = {}
            if self.partitioner is not None:
                shapes = {k: np.shape(v) for k, v in batch.items()}
                enc = jax.tree.map(lambda x: self.partitioner.param_sharding(np.shape(x)), encoder_params)
                state_sh = self.state_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                             state))
                kw = dict(in_shardings=(state_sh, self.batch_sharding(shapes), enc),
                          out_shardings=(state_sh, self.partitioner.sharding(P())))
            self._jitted[key] = jax.jit(self._step, donate_argnums=(0,), **kw)
        return self._jitted[key]

    def __call__(self, state: TrainState, batch, encoder_params):
        self.check_batch(batch)
        return self.jitted(state, batch, encoder_params)(state, batch, encoder_params)

    def lower(self, state, batch, encoder_params):
        """``jax.jit(...).lower`` on concrete or abstract (``jax.ShapeDtypeStruct``) arguments, for memory and
        cost analysis without running."""
        self.check_batch(batch)
        return self.jitted(state, batch, encoder_params).lower(state, batch, encoder_params)

    def trained_params(self, state: TrainState, ema: bool = False) -> dict:
        """The UNet's full nested parameter tree after training (the EMA weights with ``ema=True``); for LoRA the
        adapter fused into the state's base (in the compute dtype: export fuses into the original weights)."""
        if ema and state.ema is None:
            raise ValueError("this run keeps no EMA (TrainConfig.ema_decay is None)")
        return self._unet_params(state.ema if ema else state.params, state.frozen)
