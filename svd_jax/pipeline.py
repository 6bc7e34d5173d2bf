"""StableVideoDiffusionPipeline: image -> video, the whole generation as ONE jitted program.

CLIP embedding, VAE encode, every denoising step (``lax.scan``) and the frame-chunked decode run inside a
single ``jax.jit``-compiled function per static configuration (sizes, step count, CFG on/off, chunking,
batch); a second call with the same configuration reuses the compiled program.

Differences from diffusers (SPEC §1 e, k), both only for batches of more than one video:
  * diffusers repeats image embeddings per image ([e0, e0, e1, e1]) but tiles image latents ([z0, z1, z0, z1])
    when ``num_videos_per_prompt > 1``; here both are repeated per image, so every video is conditioned on
    one image.
  * diffusers decodes chunks of the flattened (videos x frames) axis, so a chunk can straddle two videos and
    its temporal layers mix them; here chunks never leave a video.
For one video (B = 1) the result equals diffusers' (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.sharding import Mesh, PartitionSpec as P

from . import preprocessing as pre
from .compile_cache import enable_compile_cache
from .models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from .models.attention import IMPLEMENTATIONS, attention_backend
from .models.layers import FF_CHUNK_BYTES, check_forward_chunk_bytes, forward_chunk_budget
from .models.vae import decode_streamed
from .scheduler import EulerScheduler, scale_model_input, step
from .sharding import Partitioner
from .weights import FLAX_DTYPES, CheckpointError

OUTPUT_TYPES = ("pil", "np", "latent")
COMPONENTS = ("unet", "vae", "image_encoder", "scheduler")


@dataclasses.dataclass
class StableVideoDiffusionPipelineOutput:
    """frames: "pil": a list (per video) of lists of PIL images; "np": (B, F, H, W, 3) float32 in [0, 1];
    "latent": the final latents (B, F, h, w, C) as a jax.Array."""

    frames: Any


def _resolve_root(path_or_repo, variant, revision, cache_dir, local_files_only) -> Path:
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json",
                "feature_extractor/preprocessor_config.json", "*/*.safetensors.index*.json",
                "*/flax_manifest.json", "*/flax_params.safetensors"]  # converted folders (python -m convert)
    patterns += [f"*/*.{variant}.safetensors", f"*/*.{variant}-*.safetensors"] if variant else \
        ["*/model.safetensors", "*/diffusion_pytorch_model.safetensors", "*/*-of-*.safetensors"]
    return Path(snapshot_download(str(path_or_repo), allow_patterns=patterns, revision=revision,
                                  cache_dir=cache_dir, local_files_only=local_files_only))


# One device: decode chunks whose full-resolution activations (chunk x H x W x the decoder's last channels) would
# exceed this are decoded streamed (frame chunks / row tiles, models/vae.py decode_streamed): the same video.
STREAM_DECODE_BYTES = 1 << 30


def resolve_dtype(dtype, mesh: Optional[Mesh] = None) -> jnp.dtype:
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
      unet, vae, image_encoder: the Flax modules; scheduler: :class:`EulerScheduler`;
      params: {"unet": ..., "vae": ..., "image_encoder": ...} parameter trees; dtype: compute dtype.
    """

    def __init__(self, unet: UNetSpatioTemporalConditionModel, vae: AutoencoderKLTemporalDecoder,
                 image_encoder: CLIPVisionModelWithProjection, scheduler: EulerScheduler, params: dict,
                 dtype=jnp.float32, image_mean=pre.CLIP_MEAN, image_std=pre.CLIP_STD,
                 partitioner: Optional[Partitioner] = None, attention: str = "auto"):
        if attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}; got {attention!r}")
        enable_compile_cache()  # compiled generations persist across processes (opt out: SVD_JAX_COMPILE_CACHE=0)
        if partitioner is not None:  # the models pin their block outputs to the mesh layout
            unet = unet.clone(constrain=partitioner.constrain)
            vae = vae.clone(constrain=partitioner.constrain)
        self.partitioner = partitioner
        self.attention = attention  # backend (models/attention.py IMPLEMENTATIONS); part of the jit cache key
        # feed-forwards whose float32 hidden layer exceeds this many bytes run in row slices (None: never);
        # part of the jit cache key (models/layers.py forward_chunk_budget)
        self.forward_chunk_bytes: Optional[int] = FF_CHUNK_BYTES
        self.unet, self.vae, self.image_encoder, self.scheduler = unet, vae, image_encoder, scheduler
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.vae_scale_factor = vae.downscale
        self._jitted = jax.jit(self._generate, static_argnames=("config",))
        self._compiled = {}  # programs built by compile(), by _program_key: calls with that key run them
        self.trace_count = 0  # how many times the generation was traced (compiled); for tests and users

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, dtype="auto", variant: Optional[str] = None,
                        *, mesh: Optional[Mesh] = None, fsdp: bool = False, attention: str = "auto",
                        revision: Optional[str] = None, cache_dir=None, local_files_only: bool = False):
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
        :mod:`svd_jax.models.attention`); ``pipe.attention`` can be changed later (the next call recompiles).
        """
        dtype = resolve_dtype(dtype, mesh)
        root = _resolve_root(path_or_repo_id, variant, revision, cache_dir, local_files_only)
        index = root / "model_index.json"
        if not index.is_file():
            raise CheckpointError(f"{root}: no model_index.json; not a diffusers pipeline folder")
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise CheckpointError(f"{root}: the pipeline folder is missing component folder(s) {missing}; "
                                  f"an SVD pipeline needs {list(COMPONENTS)}")
        part = Partitioner(mesh, fsdp) if mesh is not None else None
        kw = dict(variant=variant, param_sharding=part.param_sharding if part is not None else None)
        unet, up = UNetSpatioTemporalConditionModel.from_pretrained(root, "unet", dtype, **kw)
        vae, vp = AutoencoderKLTemporalDecoder.from_pretrained(root, "vae", dtype, **kw)
        enc, ep = CLIPVisionModelWithProjection.from_pretrained(root, "image_encoder", dtype, **kw)
        scheduler = EulerScheduler.from_pretrained(root, subfolder="scheduler")
        mean, std = pre.CLIP_MEAN, pre.CLIP_STD
        fe = root / "feature_extractor" / "preprocessor_config.json"
        if fe.is_file():
            cfg = json.loads(fe.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return cls(unet, vae, enc, scheduler, {"unet": up, "vae": vp, "image_encoder": ep}, dtype, mean, std, part,
                   attention)

    # ----------------------------------------------------------------------------------------------------------
    # The pure, jitted generation
    # ----------------------------------------------------------------------------------------------------------

    def _generate(self, params, clip_images, vae_images, image_noise, latents, video_src, sigmas, timesteps,
                  guidance, time_ids, noise_aug_strength, *, config):
        """clip_images (N, H0, W0, 3) in [0,1]; vae_images (N, H, W, 3) in [-1,1]; image_noise like vae_images;
        latents (B, F, h, w, C) unit noise; video_src (B,) the image index of each video; sigmas (n+1,);
        timesteps (n,); guidance (F,); time_ids (3,).
        Returns frames (B, F, H, W, 3) in [0, 1] (or the final latents when config.latent)."""
        self.trace_count += 1
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_backend(config[-1]))
            stack.enter_context(forward_chunk_budget(config[-2]))
            if self.partitioner is not None:
                stack.enter_context(self.partitioner.tracing())
            return self._generate_body(params, clip_images, vae_images, image_noise, latents, video_src, sigmas,
                                       timesteps, guidance, time_ids, noise_aug_strength, config[:-2])

    def _generate_body(self, params, clip_images, vae_images, image_noise, latents, video_src, sigmas, timesteps,
                       guidance, time_ids, noise_aug_strength, config):
        cfg, chunk, latent_out, progress = config
        dt = self.dtype
        b, f = latents.shape[:2]

        # CLIP branch: anti-aliased resize at the original resolution, normalise, embed.
        pixels = pre.clip_preprocess(clip_images, self.image_mean, self.image_std)
        emb = self.image_encoder.apply({"params": params["image_encoder"]}, pixels.astype(dt)).image_embeds
        emb = jnp.take(emb, video_src, axis=0)[:, None, :]  # (B, 1, D): each video its own image's embedding

        # VAE branch: noise-augmented image -> posterior mean (unscaled), in fp32 when force_upcast.
        vae, vparams = self.vae, params["vae"]
        if vae.force_upcast and jnp.dtype(dt) != jnp.float32:
            vae = vae.clone(dtype=jnp.float32)
            vparams = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), vparams)
        x = vae_images + noise_aug_strength * image_noise
        z_img = vae.apply({"params": vparams}, x, method="encode").mode().astype(dt)
        z_img = jnp.take(z_img, video_src, axis=0)  # the same image as the embedding (diffusers tiles: SPEC §1 e)

        ids = jnp.broadcast_to(time_ids.astype(dt), (b, time_ids.shape[0]))
        if cfg:  # negatives are zeros for both conditionings; [uncond; cond]
            emb = jnp.concatenate([jnp.zeros_like(emb), emb])
            z_img = jnp.concatenate([jnp.zeros_like(z_img), z_img])
            ids = jnp.concatenate([ids, ids])
        z_img = self._pin(jnp.broadcast_to(z_img[:, None], (z_img.shape[0], f) + z_img.shape[1:]))
        g = guidance.astype(jnp.float32)[None, :, None, None, None]
        uparams = params["unet"]
        n_steps = timesteps.shape[0]

        def denoise(lat, i):
            sigma, sigma_next, t = sigmas[i], sigmas[i + 1], timesteps[i]
            inp = jnp.concatenate([lat, lat]) if cfg else lat
            inp = jnp.concatenate([scale_model_input(inp, sigma).astype(dt), z_img], axis=-1)
            unet = lambda a: self.unet.apply({"params": uparams}, *a).sample.astype(jnp.float32)
            if cfg and self._sequential_cfg():
                # The two CFG halves one after the other (a scan of 2): the same maths per sample, about half
                # the UNet's activation memory. Not with a data axis, which splits the halves over devices.
                halves = lambda a: a.reshape((2, a.shape[0] // 2) + a.shape[1:])
                v = jax.lax.map(unet, (halves(inp), jnp.stack([t, t]), halves(emb), halves(ids)))
                v = v.reshape((-1,) + v.shape[2:])
            else:
                v = unet((inp, t, emb, ids))
            if cfg:
                v_u, v_c = jnp.split(v, 2)
                v = v_u + g * (v_c - v_u)
            lat = self._pin(step(v, lat, sigma, sigma_next, self.scheduler.prediction_type))
            if progress:
                jax.debug.callback(_progress_tick, i, n_steps, ordered=True)
            return lat, None

        lat, _ = jax.lax.scan(denoise, self._pin(latents.astype(jnp.float32)), jnp.arange(n_steps))
        if latent_out:
            return lat
        return self._decode(params["vae"], lat, chunk)

    def _sequential_cfg(self) -> bool:
        return self.partitioner is None or self.partitioner.data_size == 1

    def _pin(self, x):
        """Pin a (B, F, h, w, C) video tensor to the mesh's video layout (no-op without a mesh)."""
        return x if self.partitioner is None else self.partitioner.pin(x, self.partitioner.video_spec())

    def _decode(self, vparams, lat, chunk):
        """lat (B, F, h, w, C) -> frames (B, F, H, W, 3) in [0, 1], decoding at most ``chunk`` consecutive frames
        of one video at a time (lax.map), so peak memory is set by the chunk, not by B*F. With a mesh whose data
        axis (size d) divides B, d videos' chunks decode side by side, one per device group. On one device, a
        chunk whose full-resolution activations would exceed STREAM_DECODE_BYTES is decoded streamed."""
        b, f = lat.shape[:2]
        d = 1 if self.partitioner is None else self.partitioner.data_size
        d = d if b % d == 0 else 1
        z = (lat / self.vae.scaling_factor).astype(self.dtype)

        s = self.vae_scale_factor
        full_res = chunk * lat.shape[2] * s * lat.shape[3] * s * self.vae.block_out_channels[0]
        streamed = self.partitioner is None and full_res * jnp.dtype(self.dtype).itemsize > STREAM_DECODE_BYTES

        def dec(zc):  # (d, c, h, w, C) -> (d, c, H, W, 3): d videos' chunks of c frames
            flat = zc.reshape((-1,) + zc.shape[2:])
            if streamed:  # the same maths, layer by layer in slices (models/vae.py decode_streamed)
                out = decode_streamed(self.vae, vparams, flat, zc.shape[1])
            else:
                out = self.vae.apply({"params": vparams}, flat, num_frames=zc.shape[1], method="decode")
            return out.reshape(zc.shape[:2] + out.shape[1:])

        n_full, rest = divmod(f, chunk)
        parts = []
        if n_full:
            parts.append(self._decode_chunks(dec, z[:, : n_full * chunk], n_full, chunk, d))
        if rest:
            parts.append(self._decode_chunks(dec, z[:, n_full * chunk:], 1, rest, d))
        frames = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    @staticmethod
    def _decode_chunks(dec, z, n, c, d):
        """z (B, n*c, h, w, C) -> dec over (B//d * n) map steps of (d, c, h, w, C) -> (B, n*c, H, W, 3).
        Video v = i * (B // d) + j sits in data group i, so each step's d chunks are one per group."""
        b = z.shape[0]
        zs = z.reshape((d, b // d, n, c) + z.shape[2:])
        zs = jnp.moveaxis(zs, 0, 2).reshape((-1, d, c) + z.shape[2:])  # step (j, k): videos i*(B//d)+j, chunk k
        out = jax.lax.map(dec, zs)  # (B//d * n, d, c, H, W, 3)
        out = out.reshape((b // d, n, d, c) + out.shape[3:])
        out = jnp.moveaxis(out, 2, 0)  # (d, B//d, n, c, ...)
        return out.reshape((b, n * c) + out.shape[4:])

    # ----------------------------------------------------------------------------------------------------------
    # The user-facing call
    # ----------------------------------------------------------------------------------------------------------

    def __call__(self, image, height: int = 576, width: int = 1024, num_frames: Optional[int] = None,
                 num_inference_steps: int = 25, sigmas: Optional[Sequence[float]] = None,
                 min_guidance_scale: float = 1.0, max_guidance_scale: float = 3.0, fps: int = 7,
                 motion_bucket_id: int = 127, noise_aug_strength: float = 0.02,
                 decode_chunk_size: Optional[int] = None, num_videos_per_prompt: int = 1,
                 seed: Optional[int] = None, rng: Optional[jax.Array] = None, latents=None,
                 output_type: str = "pil", return_dict: bool = True, progress: bool = False):
        """Generate videos from image(s).

        Args:
          image: a PIL image, a list of them (same size), or an array (N, H0, W0, 3) in [0, 1].
          height, width: output size, multiples of 8 (576 x 1024 for SVD-XT).
          num_frames: frames per video (default: the UNet config's num_frames).
          num_inference_steps / sigmas: Euler steps, or explicit sigmas (terminal value included).
          min_guidance_scale, max_guidance_scale: per-frame linear CFG scale; CFG off when max <= 1.
          fps, motion_bucket_id, noise_aug_strength: micro-conditioning (the UNet sees fps - 1).
          decode_chunk_size: frames decoded at once within a video (default: all frames of a video).
          num_videos_per_prompt: videos per image (B = N * num_videos_per_prompt).
          seed / rng: an int or a jax PRNG key; it is split into (image-noise key, latent key).
          latents: (B, F, h, w, C) unit-variance noise (scaled by init_noise_sigma inside, as diffusers).
          output_type: "pil", "np" or "latent". progress: show a progress bar over denoising steps.

        Returns:
          StableVideoDiffusionPipelineOutput(frames) (or frames when return_dict=False).
        """
        args, config, b, bp = self._inputs(
            image, height, width, num_frames, num_inference_steps, sigmas, min_guidance_scale, max_guidance_scale,
            fps, motion_bucket_id, noise_aug_strength, decode_chunk_size, num_videos_per_prompt, seed, rng, latents,
            output_type, progress)
        program = self._compiled.get(self._program_key(args, config)) if self._compiled else None
        if self.partitioner is not None:
            args = self._place_inputs(args)
        if program is not None:
            out = program(self.params, *args)
        else:
            out = self._jitted(self.params, *args, config=config)
        if progress:
            _progress_close()
        if bp > b:
            out = out[:b]
        if output_type == "latent":
            frames = out
        else:
            frames = _to_host(out)
            if output_type == "pil":
                frames = [[PIL.Image.fromarray(f) for f in (v * 255).round().astype(np.uint8)] for v in frames]
        return StableVideoDiffusionPipelineOutput(frames) if return_dict else frames

    def lower(self, *, images: int = 1, image_size: Optional[tuple] = None, height: int = 576, width: int = 1024,
              num_frames: Optional[int] = None, num_inference_steps: int = 25, cfg: bool = True,
              decode_chunk_size: Optional[int] = None, num_videos_per_prompt: int = 1, output_type: str = "np"):
        """Trace the generation for one configuration on abstract inputs (nothing is computed on the device):
        returns a ``jax.stages.Lowered``; ``.compile().memory_analysis()`` / ``.cost_analysis()`` then give the
        program's peak memory and FLOPs, e.g. at full size with :func:`svd_jax.configs.abstract_pipeline`.

        ``images`` input images of ``image_size`` (H0, W0) (default (height, width)); ``cfg``: classifier-free
        guidance on (max_guidance_scale 3) or off (1); the rest as :meth:`__call__`. The inputs are built by the
        same code as a call's, from blank images, so the lowered program is the one a call would run.
        """
        return self._lower(images, image_size, height, width, num_frames, num_inference_steps, cfg,
                           decode_chunk_size, num_videos_per_prompt, output_type)[0]

    def compile(self, *, images: int = 1, image_size: Optional[tuple] = None, height: int = 576, width: int = 1024,
                num_frames: Optional[int] = None, num_inference_steps: int = 25, cfg: bool = True,
                decode_chunk_size: Optional[int] = None, num_videos_per_prompt: int = 1, output_type: str = "np"):
        """Compile the generation for one configuration ahead of the first call (arguments as :meth:`lower`) and
        keep it: calls with that configuration (same sizes, steps, CFG on/off, chunking, batch, options and
        parameter shapes; any image, seed and micro-conditioning values) then run it without tracing again.
        Returns the ``jax.stages.Compiled`` (``.memory_analysis()``, ``.cost_analysis()``)."""
        lowered, key = self._lower(images, image_size, height, width, num_frames, num_inference_steps, cfg,
                                   decode_chunk_size, num_videos_per_prompt, output_type)
        self._compiled[key] = compiled = lowered.compile()
        return compiled

    def _lower(self, images, image_size, height, width, num_frames, num_inference_steps, cfg, decode_chunk_size,
               num_videos_per_prompt, output_type):
        """(jax.stages.Lowered, program key) for lower() / compile()."""
        h0, w0 = image_size or (height, width)
        blank = np.zeros((images, h0, w0, 3), np.float32)
        args, config, _, _ = self._inputs(
            blank, height, width, num_frames, num_inference_steps, None, 1.0, 3.0 if cfg else 1.0, 7, 127, 0.02,
            decode_chunk_size, num_videos_per_prompt, 0, None, None, output_type, False)
        abstract = [jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=None if self.partitioner is None
                                         else self._input_sharding(i, np.shape(a))) for i, a in enumerate(args)]
        return self._jitted.lower(self.params, *abstract, config=config), self._program_key(args, config)

    def _program_key(self, args, config):
        """What a compiled program depends on besides its static config: the inputs' and parameters' shapes and
        dtypes (the input shardings follow from the shapes and the pipeline's mesh)."""
        sig = lambda a: (tuple(np.shape(a)), str(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype))
        return config, tuple(sig(a) for a in args), tuple(sig(p) for p in jax.tree_util.tree_leaves(self.params))

    def _inputs(self, image, height, width, num_frames, num_inference_steps, sigmas, min_guidance_scale,
                max_guidance_scale, fps, motion_bucket_id, noise_aug_strength, decode_chunk_size,
                num_videos_per_prompt, seed, rng, latents, output_type, progress):
        """The checked host inputs of the jitted generation for one call of :meth:`__call__` (same arguments):
        (args, static config, videos B, videos in the program B' >= B)."""
        num_frames = self.unet.num_frames if num_frames is None else num_frames
        decode_chunk_size = num_frames if decode_chunk_size is None else decode_chunk_size
        self._check(height, width, num_frames, num_inference_steps, sigmas, decode_chunk_size,
                    num_videos_per_prompt, output_type, motion_bucket_id)
        clip_images, vae_images = self._prepare_images(image, height, width)
        n = clip_images.shape[0]
        b = n * num_videos_per_prompt
        cfg = max_guidance_scale > 1
        video_src = np.repeat(np.arange(n, dtype=np.int32), num_videos_per_prompt)  # each video's image
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        c = self.unet.in_channels // 2
        if rng is None:
            rng = jax.random.PRNGKey(0 if seed is None else seed)
        k_img, k_lat = jax.random.split(rng)
        image_noise = jax.random.normal(k_img, vae_images.shape, jnp.float32)
        shape = (b, num_frames, h, w, c)
        if latents is None:
            latents = jax.random.normal(k_lat, shape, jnp.float32)
        elif tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must have shape {shape} (B, F, h, w, C); got {tuple(np.shape(latents))}")
        schedule = self.scheduler.set_timesteps(num_inference_steps if sigmas is None else None, sigmas=sigmas)
        latents = np.asarray(latents, np.float32) * np.float32(schedule.init_noise_sigma)
        bp = self._padded_batch(b, cfg)
        if bp > b:  # videos padded to split evenly over the mesh's data axis (copies of the last); cropped after
            video_src = np.concatenate([video_src, np.full(bp - b, video_src[-1], np.int32)])
            latents = np.concatenate([latents, np.repeat(latents[-1:], bp - b, axis=0)])
        guidance = jnp.linspace(min_guidance_scale, max_guidance_scale, num_frames, dtype=jnp.float32)
        time_ids = jnp.asarray([fps - 1, motion_bucket_id, noise_aug_strength], jnp.float32)
        check_forward_chunk_bytes(self.forward_chunk_bytes)
        config = (cfg, decode_chunk_size, output_type == "latent", bool(progress), self.forward_chunk_bytes,
                  self.attention)
        args = [np.asarray(clip_images, np.float32), np.asarray(vae_images, np.float32), np.asarray(image_noise),
                latents, video_src, np.asarray(schedule.sigmas, np.float32),
                np.asarray(schedule.timesteps, np.float32), np.asarray(guidance), np.asarray(time_ids),
                np.float32(noise_aug_strength)]
        return args, config, b, bp

    def _padded_batch(self, b: int, cfg: bool) -> int:
        """The number of videos in the program: b, or with a mesh the fewest >= b whose UNet batch (x2 with CFG)
        the data axis divides."""
        d = 1 if self.partitioner is None else self.partitioner.data_size
        per = 2 if cfg else 1
        bp = b
        while (bp * per) % d:
            bp += 1
        return bp

    def _place_inputs(self, args):
        """Host inputs -> global jax.Arrays on the mesh (latents split as the video layout where the mesh
        divides them, the rest replicated); each device gets its slice. Every process passes the same inputs."""
        placed = []
        for i, a in enumerate(args):
            a = np.asarray(a)
            placed.append(jax.make_array_from_callback(a.shape, self._input_sharding(i, a.shape),
                                                       lambda idx, a=a: a[idx]))
        return placed

    def _input_sharding(self, i: int, shape):
        """The sharding of the generation's i-th input: latents (i = 3) as the video layout, the rest replicated."""
        part = self.partitioner
        return part.input_sharding(part.video_spec() if i == 3 else P(), shape)

    def _check(self, height, width, num_frames, steps, sigmas, chunk, nvp, output_type, motion_bucket_id):
        def pos_int(name, v):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        for name, v in (("height", height), ("width", width)):
            pos_int(name, v)
            if v % self.vae_scale_factor:
                raise ValueError(f"{name} must be a multiple of {self.vae_scale_factor}; got {v} "
                                 f"(e.g. {v // self.vae_scale_factor * self.vae_scale_factor or self.vae_scale_factor})")
        pos_int("num_frames", num_frames)
        pos_int("decode_chunk_size", chunk)
        pos_int("num_videos_per_prompt", nvp)
        if sigmas is None:
            pos_int("num_inference_steps", steps)
        elif len(sigmas) < 2:
            raise ValueError(f"sigmas must hold at least 2 values (the terminal one included); got {list(sigmas)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if not 0 <= motion_bucket_id <= 255:
            warnings.warn(f"motion_bucket_id={motion_bucket_id} is outside the trained range [0, 255]", stacklevel=3)

    def _prepare_images(self, image, height, width):
        """-> (clip_images (N, H0, W0, 3) float32 [0,1] at the original size, vae_images (N, H, W, 3) [-1,1])."""
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)):
            if not image or not all(isinstance(i, PIL.Image.Image) for i in image):
                raise ValueError("image must be a PIL image, a non-empty list of PIL images, or an array (N, H, W, 3)")
            rgb = [pre.to_rgb(i) for i in image]
            if len({i.size for i in rgb}) > 1:
                raise ValueError(f"all images in a list must have the same size; got {[i.size for i in rgb]}")
            clip = np.stack([pre.pil_to_float(i) for i in rgb])
            vae = np.stack([pre.vae_preprocess_pil(i, height, width) for i in rgb])
            return clip, vae
        arr = np.asarray(image, np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"an image array must be (N, H, W, 3) in [0, 1]; got shape {arr.shape}")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"an image array must hold values in [0, 1]; got [{arr.min():.3g}, {arr.max():.3g}]")
        if arr.shape[1:3] == (height, width):
            vae = arr * 2 - 1
        else:  # same LANCZOS as the PIL path, on float channels
            vae = np.stack([pre.resize_float_lanczos(a, height, width) for a in arr]) * 2 - 1
        return arr, vae.astype(np.float32)


def _to_host(x) -> np.ndarray:
    """A jax.Array (possibly sharded over several processes) as one numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


_BAR = {}


def _progress_tick(i, n):
    """Host callback from inside the scan: advance a tqdm bar (created on the first step)."""
    from tqdm.auto import tqdm

    i, n = int(i), int(n)
    if i == 0 or "bar" not in _BAR:
        _progress_close()
        _BAR["bar"] = tqdm(total=n, desc="denoising", unit="step")
    _BAR["bar"].update(1)


def _progress_close():
    bar = _BAR.pop("bar", None)
    if bar is not None:
        bar.close()
