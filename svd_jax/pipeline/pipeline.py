"""StableVideoDiffusionPipeline: image -> video, the whole generation as ONE jitted program.

A thin shell over the pure stages (svd_jax/pipeline/stages.py): :meth:`~StableVideoDiffusionPipeline.from_pretrained`
loads the three networks, a call checks its arguments and builds the program inputs (svd_jax/pipeline/inputs.py),
and one ``jax.jit``-compiled :func:`~svd_jax.pipeline.stages.generate` per static configuration
(:class:`~svd_jax.options.GenerationConfig`) runs CLIP, the VAE encode, every denoising step (``lax.scan``) and the
frame-chunked decode. A second call with the same configuration reuses the compiled program.

Differences from diffusers, both only for batches of more than one video:
  * diffusers repeats image embeddings per image ([e0, e0, e1, e1]) but tiles image latents ([z0, z1, z0, z1])
    when ``num_videos_per_prompt > 1``; here both are repeated per image, so every video is conditioned on
    one image.
  * diffusers decodes chunks of the flattened (videos x frames) axis, so a chunk can straddle two videos and
    its temporal layers mix them; here chunks never leave a video.
For one video (B = 1) the result equals diffusers' (tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.sharding import Mesh

from .. import preprocessing as pre
from ..compile_cache import enable_compile_cache
from ..models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from ..options import DEFAULT_OPTIONS, MiB, ModelOptions
from ..scheduler import EulerScheduler
from ..sharding import Partitioner
from ..weights import FLAX_DTYPES, CheckpointError, resolve_pipeline_root
from . import progress, stages
from .inputs import GenerationRequest, prepare, with_request_signature

COMPONENTS = ("unet", "vae", "image_encoder", "scheduler")
# One device: decode chunks whose full-resolution activations (chunk x H x W x the decoder's last channels) would
# exceed this are decoded streamed (frame chunks / row tiles): the same video in a fraction of the memory.
STREAM_DECODE_BYTES = 1024 * MiB


@dataclasses.dataclass
class StableVideoDiffusionPipelineOutput:
    """frames: "pil": a list (per video) of lists of PIL images; "np": (B, F, H, W, 3) float32 in [0, 1];
    "latent": the final latents (B, F, h, w, C) as a jax.Array."""

    frames: Any


def resolve_dtype(dtype, mesh: Mesh | None = None) -> jnp.dtype:
    """``"auto"`` -> bfloat16 on TPU/GPU, float32 on CPU (the platform of ``mesh``'s devices, else the default
    backend); a float dtype (or its name) -> itself; anything else raises."""
    if isinstance(dtype, str) and dtype == "auto":
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in FLAX_DTYPES:
        raise ValueError(f"dtype must be one of {FLAX_DTYPES} or 'auto'; got {dtype!r}")
    return dt


class StableVideoDiffusionPipeline:
    """SVD / SVD-XT image-to-video in JAX. Build with :meth:`from_pretrained`; call with an image.

    Attributes:
      unet, vae, image_encoder: the Flax modules; scheduler: :class:`EulerScheduler`, or an EDM sampler of
        :mod:`svd_jax.samplers` (replaceable: the next call uses it);
      params: {"unet": ..., "vae": ..., "image_encoder": ...} parameter trees; dtype: compute dtype.
      options: the :class:`~svd_jax.options.ModelOptions` the networks run with (``attention`` and
        ``forward_chunk_bytes`` read and set its fields); part of the compiled configuration, so a change
        recompiles on the next call.
      stream_decode_bytes: on one device, decode chunks whose full-resolution activations exceed this many bytes
        are decoded streamed (None: never); part of the compiled configuration.
      partitioner: the :class:`~svd_jax.sharding.Partitioner` of the mesh the pipeline runs on, or None.
    """

    def __init__(self, unet: UNetSpatioTemporalConditionModel, vae: AutoencoderKLTemporalDecoder,
                 image_encoder: CLIPVisionModelWithProjection, scheduler: EulerScheduler, params: dict,
                 dtype=jnp.float32, image_mean=pre.CLIP_MEAN, image_std=pre.CLIP_STD,
                 partitioner: Partitioner | None = None, attention: str = "auto",
                 options: ModelOptions | None = None):
        self.options = _merge_options(options, attention)
        enable_compile_cache()  # compiled generations persist across processes (opt out: SVD_JAX_COMPILE_CACHE=0)
        self.partitioner = partitioner
        self.stream_decode_bytes: int | None = STREAM_DECODE_BYTES
        self.unet, self.vae, self.image_encoder, self.scheduler = unet, vae, image_encoder, scheduler
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.vae_scale_factor = vae.downscale
        self._jitted = jax.jit(self._program, static_argnames=("config",))
        # The same generation as three programs, run step by step from the host when a call asks for progress
        # (stages.begin / denoise_step / finish): no host callbacks, so they persist in the compile cache.
        self._begin = jax.jit(lambda p, inputs, config: stages.begin(self.modules, p, inputs, config),
                              static_argnames=("config",))
        self._step = jax.jit(self._step_program, static_argnames=("config",), donate_argnums=(2,))
        self._finish = jax.jit(lambda p, lat, config: stages.finish(self.modules, p, lat, config),
                               static_argnames=("config",))
        self._compiled = {}  # programs built by compile(), by _program_key: calls with that key run them
        self.trace_count = 0  # how many times the generation was traced (compiled); for tests and users
        # LoRA: the UNet params before any adapter (None: none fused), the loaded adapters, the active weights
        self._lora_base, self._lora_adapters, self._lora_active = None, {}, {}
        self._lora_fused = True  # fuse_lora() / unfuse_lora()

    @property
    def attention(self) -> str:
        """The attention backend (``svd_jax.options.ATTENTION_BACKENDS``); setting it recompiles on the next call."""
        return self.options.attention

    @attention.setter
    def attention(self, name: str):
        self.options = self.options.replace(attention=name)

    @property
    def forward_chunk_bytes(self) -> int | None:
        """Feed-forwards whose float32 hidden layer exceeds this many bytes run in row slices (None: never)."""
        return self.options.forward_chunk_bytes

    @forward_chunk_bytes.setter
    def forward_chunk_bytes(self, max_bytes: int | None):
        self.options = self.options.replace(forward_chunk_bytes=max_bytes)

    @property
    def modules(self) -> stages.Modules:
        """The three networks, as the stage functions take them."""
        return stages.Modules(self.unet, self.vae, self.image_encoder)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, dtype="auto", variant: str | None = None,
                        *, mesh: Mesh | None = None, fsdp: bool = False, attention: str = "auto",
                        options: ModelOptions | None = None, revision: str | None = None, cache_dir=None,
                        local_files_only: bool = False, scheduler=None, scheduler_config: dict | None = None):
        """Load a diffusers-layout SVD folder or hub repo (model_index.json, unet/, vae/, image_encoder/,
        scheduler/, feature_extractor/). ``variant="fp16"`` reads the fp16 files; weights are cast to ``dtype``.

        ``dtype``: the compute and parameter dtype (float32, bfloat16 or float16), or ``"auto"``: bfloat16 on
        TPU and GPU, float32 on CPU (XLA's CPU backend computes bf16 matmuls in f32, so bf16 only loses there).
        Norms, softmax, sinusoids and the scheduler run in float32 whatever the dtype.

        ``mesh`` (:func:`svd_jax.sharding.make_mesh`): parameters are placed on the mesh as they load (each
        device reads its own slice from the memory-mapped file: replicated, or split over all devices with
        ``fsdp=True``) and every call runs sharded (videos and CFG halves over ``data``, frame height over
        ``space``). Without a mesh everything runs on the default device.

        ``attention``: the attention backend ("auto", "xla", "blockwise", "cudnn", "pallas"; see
        :mod:`svd_jax.models.attention`); ``options``: all the model options (:class:`ModelOptions`), of which
        ``attention`` sets one. Both can be changed later (``pipe.attention``, ``pipe.options``); the next call
        recompiles.

        ``scheduler``: the sampler (:mod:`svd_jax.samplers`): None or ``"euler"`` (the folder's
        EulerDiscreteScheduler, today's default), ``"edm_euler"`` (diffusers' EDMEulerScheduler) or
        ``"edm_dpmsolver++"`` (EDMDPMSolverMultistepScheduler, DPM-Solver++ 2M), the EDM ones configured for SVD
        (sigma_min / sigma_max / prediction_type from the folder's scheduler config, sigma_data 1), or a scheduler
        object; ``scheduler_config``: diffusers-named overrides (``{"solver_order": 3, "sigma_schedule":
        "exponential"}``). ``pipe.scheduler`` may be replaced later (a multistep sampler compiles its own
        program; the Euler ones share one).
        """
        from ..samplers import SCHEDULER_NAMES, make_scheduler

        options = _merge_options(options, attention)  # checked before anything is loaded
        if isinstance(scheduler, str) and scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES} or a scheduler object; got {scheduler!r}")
        if scheduler is not None and not isinstance(scheduler, str) and scheduler_config:
            raise ValueError("scheduler_config applies to a scheduler given by name, not to a scheduler object")
        dtype = resolve_dtype(dtype, mesh)
        root = resolve_pipeline_root(path_or_repo_id, variant, revision, cache_dir, local_files_only)
        index = root / "model_index.json"
        if not index.is_file():
            raise CheckpointError(f"{root}: no model_index.json; not a diffusers pipeline folder")
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise CheckpointError(f"{root}: the pipeline folder is missing component folder(s) {missing}; "
                                  f"an SVD pipeline needs {list(COMPONENTS)}")
        base_scheduler = EulerScheduler.from_pretrained(root, subfolder="scheduler")
        if isinstance(scheduler, str) or scheduler is None:  # unsupported settings raise before any weight loads
            scheduler = make_scheduler(scheduler or "euler", base_scheduler, scheduler_config)
        part = Partitioner(mesh, fsdp) if mesh is not None else None
        kw = dict(variant=variant, param_sharding=part.param_sharding if part is not None else None)
        unet, up = UNetSpatioTemporalConditionModel.from_pretrained(root, "unet", dtype, **kw)
        vae, vp = AutoencoderKLTemporalDecoder.from_pretrained(root, "vae", dtype, **kw)
        enc, ep = CLIPVisionModelWithProjection.from_pretrained(root, "image_encoder", dtype, **kw)
        mean, std = pre.CLIP_MEAN, pre.CLIP_STD
        fe = root / "feature_extractor" / "preprocessor_config.json"
        if fe.is_file():
            cfg = json.loads(fe.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            _check_processor_size(cfg, enc.image_size, fe)
        return cls(unet, vae, enc, scheduler, {"unet": up, "vae": vp, "image_encoder": ep}, dtype, mean, std, part,
                   options=options)

    @classmethod
    def from_single_file(cls, path, dtype="auto", *, mesh: Mesh | None = None, fsdp: bool = False,
                         num_frames: int | None = None, configs=None, attention: str = "auto",
                         options: ModelOptions | None = None, scheduler=None, scheduler_config: dict | None = None,
                         numerics: str = "diffusers"):
        """Load all three networks from one of Stability's original files (``svd.safetensors``,
        ``svd_xt.safetensors``, ``svd_xt_1_1.safetensors``), the scheduler and image processor from SVD's known
        configs (svd_jax/single_file.py). ``num_frames``: the UNet's default frame count (default: 14 for a file
        named ``svd*``, 25 for ``svd_xt*``); ``configs``: {"unet" / "vae" / "image_encoder": diffusers-style
        config}, or a folder holding ``<component>/config.json`` (e.g. a diffusers pipeline folder of that
        architecture), to load other architectures (default SVD-XT's); ``numerics``: ``"diffusers"`` (the default: the
        UNet computes as diffusers' does, GroupNorm eps 1e-6 in some blocks) or ``"sgm"`` (Stability's original
        model: 1e-5 everywhere); the other arguments as :meth:`from_pretrained`. The image-decoder variants are
        refused with a clear error."""
        from ..single_file import pipeline_from_single_file

        return pipeline_from_single_file(cls, path, dtype, mesh=mesh, fsdp=fsdp, num_frames=num_frames,
                                         configs=configs, attention=attention, options=options,
                                         scheduler=scheduler, scheduler_config=scheduler_config, numerics=numerics)

    def _program(self, params, inputs, *, config):
        self.trace_count += 1
        return stages.generate(self.modules, _with_unfused_lora(params), inputs, config)

    def _step_program(self, params, cond, carry, i, sigmas, timesteps, coefs, *, config):
        unet = stages.with_options(self.unet, config.model)
        return stages.denoise_step(unet, _with_unfused_lora(params)["unet"], cond, carry, i, sigmas, timesteps,
                                   coefs, config)

    def _run_stepwise(self, inputs, config, callback=None, callback_steps=1):
        """The generation with a progress bar: begin, one program call per step (the bar advances as each
        finishes), finish. Each program is compiled once per configuration and persists in the compile cache.
        ``callback(step, sigma, latents)`` is called from this loop (no host callback in the programs)."""
        lat, cond = self._begin(self.params, inputs, config=config)
        n = int(np.shape(inputs.timesteps)[0])
        progress.start(n)
        try:
            for i in range(n):
                lat = self._step(self.params, cond, lat, np.int32(i), inputs.sigmas, inputs.timesteps,
                                 inputs.solver_coefs, config=config)
                jax.block_until_ready(lat)
                progress.tick()
                if callback is not None and ((i + 1) % callback_steps == 0 or i == n - 1):
                    callback(i, float(inputs.sigmas[i + 1]),
                             _to_host(stages.carry_latents(lat, config)))
        finally:
            progress.close()
        return self._finish(self.params, lat, config=config)

    @with_request_signature
    def __call__(self, image, *, return_dict: bool = True, **kwargs):
        """Generate videos from image(s).

        Args:
          image: a PIL image, a list of them (same size), or an array (N, H0, W0, 3) in [0, 1].
          **kwargs: the fields of :class:`~svd_jax.pipeline.inputs.GenerationRequest`, all optional:
            height, width (multiples of 8; 576 x 1024), num_frames (the UNet config's), num_inference_steps (25)
            or sigmas (explicit, terminal value included), min_guidance_scale (1), max_guidance_scale (3; CFG
            off when <= 1), fps (7), motion_bucket_id (127), noise_aug_strength (0.02), decode_chunk_size (all
            frames of a video), num_videos_per_prompt (1), seed / rng (an int or a jax PRNG key), latents
            ((B, F, h, w, C) unit noise), output_type ("pil", "np" or "latent"), progress (a progress bar),
            callback_on_step_end (``fn(step, sigma, latents)`` on the host every callback_steps (1) steps and
            after the last; latents (B', F, h, w, C) numpy). A callback costs one device-to-host copy of the
            latents per call, and its program (an ``io_callback``) is not kept in the persistent compile cache:
            it compiles once per process; the same program serves every callback function.
          return_dict: wrap the frames in :class:`StableVideoDiffusionPipelineOutput`.

        Returns:
          StableVideoDiffusionPipelineOutput(frames) (or frames when return_dict=False): "pil" a list per video of
          PIL images; "np" (B, F, H, W, 3) float32 in [0, 1]; "latent" the final latents (B, F, h, w, C).
        """
        req = GenerationRequest.from_kwargs("StableVideoDiffusionPipeline.__call__", kwargs)
        inputs, config, b, bp = prepare(self, image, req)
        program = self._compiled.get(self._program_key(inputs, config)) if self._compiled else None
        if self.partitioner is not None:
            inputs = inputs.place(self.partitioner)
        if req.progress:
            out = self._run_stepwise(inputs, config, req.callback_on_step_end, req.callback_steps)
        else:
            previous = stages.set_callback(req.callback_on_step_end)
            try:
                out = program(self.params, inputs) if program is not None else \
                    self._jitted(self.params, inputs, config=config)
                if config.callback_steps is not None:
                    jax.effects_barrier()  # every callback has run before the call returns
            finally:
                stages.set_callback(previous)
        if bp > b:
            out = out[:b]
        if req.output_type == "latent":
            frames = out
            _check_finite(bool(jnp.isfinite(out).all()), self.dtype)
        else:
            frames = _to_host(out)
            _check_finite(bool(np.isfinite(frames).all()), self.dtype)
            if req.output_type == "pil":
                frames = [[PIL.Image.fromarray(f) for f in (v * 255).round().astype(np.uint8)] for v in frames]
        return StableVideoDiffusionPipelineOutput(frames) if return_dict else frames

    @with_request_signature(output_type="np")
    def lower(self, *, images: int = 1, image_size: tuple | None = None, cfg: bool | None = None, **kwargs):
        """Trace the generation for one configuration on abstract inputs (nothing is computed on the device):
        returns a ``jax.stages.Lowered``; ``.compile().memory_analysis()`` / ``.cost_analysis()`` then give the
        program's peak memory and FLOPs, e.g. at full size with :func:`svd_jax.configs.abstract_pipeline`.

        ``images`` input images of ``image_size`` (H0, W0) (default (height, width)); ``cfg``: classifier-free
        guidance on (max_guidance_scale 3) or off (1), default on; ``kwargs`` as :meth:`__call__`'s (values that
        do not change the program, such as seed or fps, do not matter; output_type defaults to "np"). The inputs
        are built by the same code as a call's, from blank images, so the lowered program is the one a call
        would run.
        """
        return self._lower(images, image_size, cfg, kwargs)[0]

    @with_request_signature(output_type="np")
    def compile(self, *, images: int = 1, image_size: tuple | None = None, cfg: bool | None = None,
                **kwargs):
        """Compile the generation for one configuration ahead of the first call (arguments as :meth:`lower`) and
        keep it: calls with that configuration (same sizes, steps, CFG on/off, chunking, batch, options and
        parameter shapes; any image, seed and micro-conditioning values) then run it without tracing again
        (calls with ``progress=True`` run the stepwise programs instead, compiled on their first use).
        Returns the ``jax.stages.Compiled`` (``.memory_analysis()``, ``.cost_analysis()``)."""
        lowered, key = self._lower(images, image_size, cfg, kwargs)
        self._compiled[key] = compiled = lowered.compile()
        return compiled

    # LoRA adapters (svd_jax/lora.py). Fused (the default): added into a copy of the UNet params, so a denoising
    # step costs the same as without one. Unfused: the base params stay as they are and the program adds the
    # adapters' factors itself at its start. Either way the base params are kept and restored exactly, and a new
    # weight is new values, not new shapes: no recompile.
    def load_lora_weights(self, path_or_repo, adapter_name: str | None = None, scale: float = 1.0,
                          weight_name: str | None = None, subfolder: str | None = None) -> str:
        """Load a LoRA (peft folder, diffusers-style file or hub repo id; :func:`svd_jax.lora.load_lora`; or an
        already loaded :class:`svd_jax.lora.LoRA`) and use
        it in the next calls, beside the adapters already loaded, with weight ``scale``. Returns its name
        (``adapter_name``, default ``"adapter_<n>"``). An adapter that does not fit the UNet raises
        ``LoRAError`` and changes nothing."""
        from ..lora import LoRA, LoRAError, check_fits, load_lora

        lora = path_or_repo if isinstance(path_or_repo, LoRA) else \
            load_lora(path_or_repo, weight_name=weight_name, subfolder=subfolder)
        adapters = self._lora_adapters
        name = adapter_name or f"adapter_{len(adapters)}"
        if name in adapters:
            raise LoRAError(f"an adapter named {name!r} is loaded already; unload_lora_weights() or another name")
        check_fits(self._lora_base if self._lora_base is not None else self.params["unet"], lora)
        self._apply_adapters({**adapters, name: lora}, {**self._lora_active, name: scale})
        return name

    def set_adapters(self, adapter_names, weights=None) -> None:
        """Use only ``adapter_names`` (a name or a list), with ``weights`` (one float, or one per adapter;
        default 1.0)."""
        from ..lora import LoRAError

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [1.0] * len(names) if weights is None else weights
        weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
        adapters = self._lora_adapters
        unknown = [n for n in names if n not in adapters]
        if unknown or len(weights) != len(names):
            raise LoRAError(f"set_adapters: unknown adapters {unknown} (loaded: {sorted(adapters)})" if unknown else
                            f"set_adapters: {len(weights)} weights for {len(names)} adapters")
        self._apply_adapters(adapters, dict(zip(names, weights)))

    def fuse_lora(self) -> None:
        """Fuse the active adapters into a copy of the UNet params (the default after ``load_lora_weights``):
        zero cost per denoising step; a new weight re-fuses on the device (no recompile)."""
        self._require_adapters("fuse_lora")
        self._lora_fused = True
        self._apply_adapters(self._lora_adapters, self._lora_active)

    def unfuse_lora(self) -> None:
        """Keep the base UNet params as they are and pass the active adapters' factors (A, B, weight x alpha / r)
        to the program, which adds ``weight * (alpha/r) * B @ A`` to each adapted kernel once per call, before
        its denoising loop (and once per step in the step-by-step program of ``progress=True``). A new weight is
        a new value for the same program. The first call after switching compiles once (the inputs differ)."""
        self._require_adapters("unfuse_lora")
        self._lora_fused = False
        self._apply_adapters(self._lora_adapters, self._lora_active)

    def unload_lora_weights(self) -> None:
        """Drop every adapter: the UNet params become the base params again (the same arrays)."""
        params = {k: v for k, v in self.params.items() if k != "lora"}
        if self._lora_base is not None:
            params["unet"] = self._lora_base
        self.params = params
        self._lora_base, self._lora_adapters, self._lora_active, self._lora_fused = None, {}, {}, True

    def _require_adapters(self, what: str) -> None:
        from ..lora import LoRAError

        if not self._lora_adapters:
            raise LoRAError(f"{what}: no adapter is loaded (load_lora_weights first)")

    def _apply_adapters(self, adapters, active) -> None:
        """The params for ``active`` ({name: weight}) of ``adapters``: fused into the UNet's kernels, or (unfused)
        the base kernels plus ``params["lora"]``, a list of :func:`svd_jax.lora.factors` per active adapter
        (placed like their base weights on a mesh)."""
        from ..lora import apply_lora, factors

        base = self.params["unet"] if self._lora_base is None else self._lora_base
        names = list(active)
        params = {k: v for k, v in self.params.items() if k != "lora"}
        if self._lora_fused or not names:
            params["unet"] = apply_lora(base, [adapters[n] for n in names], [active[n] for n in names]) \
                if names else base
        else:
            lora = [factors(adapters[n], active[n]) for n in names]
            if self.partitioner is not None:
                lora = jax.tree.map(lambda x: jax.device_put(x, self.partitioner.param_sharding(x.shape)), lora)
            params["unet"], params["lora"] = base, lora
        self.params = params
        self._lora_base, self._lora_adapters, self._lora_active = base, adapters, active

    def _lower(self, images, image_size, cfg, kwargs):
        """(jax.stages.Lowered, program key) for lower() / compile()."""
        kwargs = dict(kwargs)
        kwargs.setdefault("output_type", "np")
        if cfg is not None:
            kwargs["max_guidance_scale"] = 3.0 if cfg else 1.0
        req = GenerationRequest.from_kwargs("StableVideoDiffusionPipeline.lower", kwargs)
        h0, w0 = image_size or (req.height, req.width)
        inputs, config, _, _ = prepare(self, np.zeros((images, h0, w0, 3), np.float32), req)
        lowered = self._jitted.lower(self.params, inputs.abstract(self.partitioner), config=config)
        return lowered, self._program_key(inputs, config)

    def _program_key(self, inputs, config):
        """What a compiled program depends on besides its static config: the inputs' and parameters' shapes and
        dtypes (the input shardings follow from the shapes and the pipeline's mesh)."""
        sig = lambda a: (tuple(np.shape(a)), str(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype))
        return config, inputs.signature(), tuple(sig(p) for p in jax.tree_util.tree_leaves(self.params))


def _with_unfused_lora(params: dict) -> dict:
    """Inside a program: the UNet params with ``params["lora"]`` (unfused adapters' factors) added, if any."""
    if "lora" not in params:
        return params
    from ..lora import fuse

    rest = {k: v for k, v in params.items() if k != "lora"}
    return {**rest, "unet": fuse(params["unet"], params["lora"])}


def _check_finite(finite: bool, dtype) -> None:
    """RuntimeError, instead of a silently black video, when the program produced NaN or inf."""
    if not finite:
        hint = "float16 overflows easily: try bfloat16 or float32; " if jnp.dtype(dtype) == jnp.float16 else ""
        raise RuntimeError(f"the generation produced non-finite values (NaN or inf) with dtype {jnp.dtype(dtype).name}"
                           f": {hint}the weights may be corrupt (safetensors files carry no checksum: compare them "
                           "with the source, or download them again)")


def _processor_size(cfg: dict) -> tuple[int, int] | None:
    """The (height, width) a CLIPImageProcessor config (``preprocessor_config.json``) makes its images: the
    ``crop_size`` when it center-crops, else a ``size`` of height and width; None where it does not say (a
    ``shortest_edge`` resize without a crop)."""
    def hw(v):
        if isinstance(v, int):
            return v, v
        if isinstance(v, dict) and "height" in v and "width" in v:
            return int(v["height"]), int(v["width"])
        return None

    if cfg.get("do_center_crop", True) and cfg.get("crop_size") is not None:
        return hw(cfg["crop_size"])
    return hw(cfg.get("size")) if cfg.get("do_resize", True) else None


def _check_processor_size(cfg: dict, image_size: int, where) -> None:
    """Warn where the feature extractor's size is not the image encoder's: the CLIP input is resized to the
    encoder's ``image_size`` (what diffusers' ``_encode_image`` feeds it: 224, SVD's; it never applies the
    feature extractor's resize or crop), the only size the encoder takes."""
    size = _processor_size(cfg)
    if size is not None and size != (image_size, image_size):
        warnings.warn(f"{where}: the feature extractor's size {size[0]}x{size[1]} is not the image encoder's "
                      f"image_size {image_size}; CLIP images are resized to {image_size}x{image_size}",
                      stacklevel=3)


def _merge_options(options: ModelOptions | None, attention: str) -> ModelOptions:
    """``options`` (default: the defaults) with ``attention`` where it is not the default "auto"."""
    options = DEFAULT_OPTIONS if options is None else options
    return options if attention == "auto" else options.replace(attention=attention)


def _to_host(x) -> np.ndarray:
    """A jax.Array (possibly sharded over several processes) as one numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
