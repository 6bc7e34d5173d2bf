"""The fine-tuning run: video files in, a diffusers-layout pipeline folder out (what ``svd-jax train`` calls).

:func:`train` checks every setting and reads the dataset's index before it loads a weight, then loops:
a batch from the :class:`~svd_jax.training.data.ClipLoader` (decoded ahead by a background thread), one jitted
:class:`~svd_jax.training.step.TrainStep`, a line of ``OUTPUT/metrics.jsonl``, a checkpoint every ``save_every``
steps (orbax, ``OUTPUT/checkpoints``; the whole state and the data position), optionally a sample video. At the
end the last state is checkpointed and the trained UNet exported with the base model's other components
(``OUTPUT/unet``, ``OUTPUT/vae``, ..., ``OUTPUT/model_index.json``), which diffusers and ``svd-jax generate
--model OUTPUT`` load.

Resuming (``resume=True``) restores the latest checkpoint, onto this run's mesh, and continues from its step
and data position: the result is bit-identical to an uninterrupted run (the batches depend only on the seed and
the step, the step's random draws on the seed and the step number). A checkpoint of other settings is refused.
An interrupt (Ctrl-C, SIGTERM turned into KeyboardInterrupt) saves the last completed step before it exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import CheckpointError, TrainCheckpointer
from .config import TrainConfig
from .data import ClipLoader, VideoClipDataset
from .export import export_pipeline
from .step import TrainStep

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did: the final state, the step reached, the last metrics, the dataset's skipped files,
    the exported folder (the pipeline folder, or a LoRA run's adapter folder; None without export), and the loss
    of every step this call ran."""

    state: Any
    step: int
    metrics: dict
    skipped: list
    exported: Path | None
    losses: list


def _is_main() -> bool:
    return jax.process_index() == 0


def _read_metrics(path: Path, upto: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to step ``upto`` (a resumed run rewrites what followed)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


def _global_batch(step: TrainStep, local: dict) -> dict:
    """This process's rows -> global arrays on the step's mesh (or the default device)."""
    if step.partitioner is None:
        return {k: jnp.asarray(v) for k, v in local.items()}
    shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in local.items()}
    shardings = step.batch_sharding(shapes)
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v), shapes[k])
            for k, v in local.items()}


def _host(x):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)


def train(model: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike, config: TrainConfig, *,
          save_every: int | None = None, keep_checkpoints: int = 3, resume: bool = False,
          frame_stride: int = 1, mesh=None, fsdp: bool = True, variant: str | None = None,
          sample_every: int | None = None, sample_image: str | os.PathLike | None = None,
          sample_steps: int = 10, export: bool = True, export_ema: bool | None = None,
          export_dtype: str | None = "float32", progress: bool = True, prefetch: int = 2,
          cache_latents: bool = False, export_fused: bool = False,
          local_files_only: bool = False) -> TrainResult:
    """Fine-tune the UNet of the SVD pipeline ``model`` on the videos in ``data``; write ``output``.

    Args:
      model: the base pipeline, a local diffusers-layout folder or a hub repo id.
      data: a folder of videos (recursive) or a JSONL manifest (``path``, optional ``fps``, ``motion_bucket_id``);
        see :class:`~svd_jax.training.data.VideoClipDataset`. Clips are ``config.num_frames`` frames, every
        ``frame_stride``-th, resized and centre-cropped to ``config.height`` x ``config.width``.
      output: the run's folder: ``metrics.jsonl``, ``checkpoints/``, ``samples/`` and, at the end, the exported
        pipeline.
      config: the :class:`~svd_jax.training.config.TrainConfig`; ``config.max_steps`` is where the run ends.
      save_every: checkpoint every this many steps (None: only at the end and on an interrupt);
        keep_checkpoints: the newest this many are kept.
      resume: continue from the latest checkpoint in ``output`` (a fresh start if there is none). Without it,
        an ``output`` that has checkpoints is refused, so nothing is overwritten.
      mesh: a :func:`svd_jax.sharding.make_mesh` mesh to train on (clips over ``data``, a clip's height over
        ``space``), with ``fsdp`` weights, gradients and optimizer state split over all devices. None: one device.
      sample_every, sample_image: every this many steps (and at the end) generate a video from ``sample_image``
        with the current weights (``sample_steps`` denoising steps, the clip size) into ``output/samples/``.
      export: write the exported pipeline at the end (the EMA weights where ``config.ema_decay`` is set, unless
        ``export_ema=False``), in ``export_dtype`` (None: float32 master weights as they are). A LoRA run
        (``config.trainable="lora"``) always writes its adapter as a peft folder into ``output``
        (``adapter_config.json`` + ``adapter_model.safetensors``, :func:`svd_jax.lora.save_lora`; what
        ``pipe.load_lora_weights(output)`` and peft load) and the pipeline with the adapter fused only with
        ``export_fused=True`` (and ``export``).
      progress: a progress bar (loss, steps/s, data wait, ETA) on stderr.
      cache_latents: encode one clip of every video once (VAE latents of its frames, CLIP embedding of its first
        frame) before training, and train on those: the steps then run the UNet and only the VAE encode of the
        noise-augmented first frame, and decode no video. Each video contributes that one clip (drawn from the
        seed) instead of a new random clip every time it comes up. Held in host memory (per clip
        (F, h, w, 4) + (H, W, 3) + (1, D) float32).
    Returns:
      :class:`TrainResult`.
    """
    config.check()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; pass a folder")
    if save_every is not None and (isinstance(save_every, bool) or save_every < 1):
        raise ValueError(f"save_every must be a positive number of steps or None; got {save_every!r}")
    if sample_every is not None and sample_image is None:
        raise ValueError("sample_every needs sample_image (the image the sample videos start from)")
    if sample_image is not None and not Path(sample_image).is_file():
        raise ValueError(f"sample_image {sample_image}: no such file")
    ckpt_dir = out / CHECKPOINTS
    # The dataset's index first: a bad folder is reported before any weight is loaded.
    dataset = VideoClipDataset(data, config.num_frames, config.height, config.width, frame_stride=frame_stride)
    fingerprint = {"train": config.fingerprint(), "frame_stride": frame_stride, "cache_latents": cache_latents}
    checkpointer = TrainCheckpointer(ckpt_dir, keep=keep_checkpoints, save_every=save_every,
                                     fingerprint=fingerprint)
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        checkpointer.close()
        raise CheckpointError(f"{ckpt_dir} holds checkpoints (latest: step {latest}); pass resume=True "
                              "(--resume) to continue that run, or choose a new output folder")
    if latest is not None:  # the settings must match before anything heavy happens
        from .checkpoint import fingerprint_differences

        stored = checkpointer.read_metadata(latest).get("fingerprint")
        diff = fingerprint_differences(stored, fingerprint)
        if diff:
            checkpointer.close()
            raise CheckpointError(f"the checkpoint in {ckpt_dir} (step {latest}) is of other settings: "
                                  f"{'; '.join(diff)}; resume with the same settings or start a new output dir")
        if latest >= config.max_steps:
            print(f"svd-jax train: the checkpoint is at step {latest} >= max_steps {config.max_steps}; "
                  "nothing to train", file=sys.stderr)

    from ..pipeline import StableVideoDiffusionPipeline
    from ..sharding import Partitioner

    pipe = StableVideoDiffusionPipeline.from_pretrained(model, dtype="float32", variant=variant, mesh=mesh,
                                                        fsdp=fsdp and mesh is not None,
                                                        local_files_only=local_files_only)
    partitioner = Partitioner(mesh, fsdp=fsdp) if mesh is not None else None
    step = TrainStep(pipe.unet, pipe.vae, pipe.image_encoder, config, partitioner=partitioner,
                     clip_mean=pipe.image_mean, clip_std=pipe.image_std)
    # The encoders only run forward: keep them in the compute dtype (the VAE encodes in float32 where its config
    # says force_upcast, as in generation).
    encoders = {k: jax.tree.map(lambda p: p.astype(step.dtype), pipe.params[k]) for k in ("vae", "image_encoder")}
    unet_params = pipe.params.pop("unet")
    position, start = 0, 0
    if latest is not None:
        abstract = step.abstract_state(unet_params)
        shardings = step.state_shardings(abstract)
        if shardings is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
        state, meta = checkpointer.restore(abstract, latest)
        del unet_params
        position, start = int(meta["position"]), int(meta["step"])
    else:
        state = step.init(unet_params)
        del unet_params
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS
    if _is_main():
        _read_metrics(metrics_path, start)

    source = LatentCache(step, dataset, encoders, config.seed, progress and _is_main()) if cache_latents else dataset
    loader = ClipLoader(source, config.batch_size, seed=config.seed, position=position, prefetch=prefetch)
    bar = None
    if progress and _is_main() and start < config.max_steps:
        from tqdm import tqdm  # the text bar: tqdm.auto needs ipywidgets in a notebook

        bar = tqdm(total=config.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    losses, last = [], {}
    s = start
    sample = _Sampler(pipe, step, sample_image, sample_steps, out / SAMPLES) if sample_image is not None else None
    try:
        with open(metrics_path, "a") if _is_main() else open(os.devnull, "w") as log:
            while s < config.max_steps:
                t0 = time.perf_counter()
                local = next(loader)
                batch = _global_batch(step, local)
                state, metrics = step(state, batch, encoders)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                s += 1
                last = {"step": s, **metrics, "data_wait_s": round(loader.last_wait, 4),
                        "step_s": round(time.perf_counter() - t0, 4)}
                losses.append(metrics["loss"])
                log.write(json.dumps(last) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", wait=f"{loader.last_wait:.2f}s", refresh=False)
                    bar.update(1)
                if checkpointer.should_save(s):
                    checkpointer.save(s, state, {"position": loader.position, "step": s})
                if sample is not None and sample_every and s % sample_every == 0:
                    sample(state, s)
    except KeyboardInterrupt:
        if s > start:  # the state of the last completed step is whole: keep it
            checkpointer.save(s, state, {"position": loader.position, "step": s}, force=True)
            checkpointer.wait()
            print(f"\nsvd-jax train: interrupted; saved step {s} in {ckpt_dir} (resume with --resume)",
                  file=sys.stderr)
        raise
    finally:
        loader.close()
        if bar is not None:
            bar.close()
    if s > start and s not in checkpointer.all_steps():
        checkpointer.save(s, state, {"position": loader.position, "step": s}, force=True)
    checkpointer.wait()
    checkpointer.close()
    exported = None
    use_ema = config.ema_decay is not None if export_ema is None else export_ema
    lora = None
    if step.lora:  # the adapter is the run's result: always written (gathered on every process: a collective)
        trained = _host(state.ema if use_ema else state.params)
        lora = step.trained_lora(state.replace(params=trained, ema=trained))
        if _is_main():
            from ..lora import save_lora

            exported = save_lora(lora, out, base_model_name_or_path=str(model))
    if export and (not step.lora or export_fused):
        params = None
        if not step.lora:
            params = _host(step.trained_params(state, ema=use_ema))
        elif _is_main():  # fused into the base weights as stored, not the state's compute-dtype copy
            from ..lora import apply_lora
            from ..models import UNetSpatioTemporalConditionModel

            _, base = UNetSpatioTemporalConditionModel.from_pretrained(model, "unet", jnp.float32, variant=variant,
                                                                       local_files_only=local_files_only)
            params = jax.device_get(apply_lora(base, lora))
            del base
        if _is_main():
            exported = export_pipeline(model, pipe.unet, params, out, dtype=export_dtype, variant=variant,
                                       local_files_only=local_files_only)
    if sample is not None and (not sample_every or s % sample_every):
        sample(state, s)
    return TrainResult(state, s, last, list(dataset.skipped), exported, losses)


class LatentCache:
    """One clip of every video of ``dataset``, encoded once: a stand-in for the dataset in a ClipLoader.

    ``clip(index, rng)`` returns {"latents": (F, h, w, C) (scaled, as the step's x0), "first_frame": (H, W, 3)
    in [-1, 1], "image_embeds": (1, D), "fps": (), "motion_bucket_id": ()} float32 (``rng`` is not used: the
    clip of video i was drawn once, from ``numpy.random.default_rng([seed, 2**31, i])``).
    """

    def __init__(self, step: TrainStep, dataset: VideoClipDataset, encoders: dict, seed: int, progress: bool):
        def encode(pixels):  # (1, F, H, W, 3) -> latents (1, F, h, w, C), embedding (1, 1, D); no dropout here:
            # the step draws its own for every use of a cached clip
            return step.encode_latents(pixels, encoders), step.embed(pixels[:, 0], encoders)

        encode_fn = jax.jit(encode)
        self.items = []
        todo = range(len(dataset))
        if progress:
            from tqdm import tqdm

            todo = tqdm(todo, desc="caching latents", unit="clip")
        for i in todo:
            clip = dataset.clip(i, np.random.default_rng([seed, 2**31, i]))
            x0, emb = jax.device_get(encode_fn(jnp.asarray(clip["pixels"])[None]))
            self.items.append({"latents": np.asarray(x0[0], np.float32), "first_frame": clip["pixels"][0],
                               "image_embeds": np.asarray(emb[0], np.float32), "fps": clip["fps"],
                               "motion_bucket_id": clip["motion_bucket_id"]})

    def __len__(self) -> int:
        return len(self.items)

    def clip(self, index: int, rng=None) -> dict:
        return self.items[index]


class _Sampler:
    """Sample videos with the current weights: the pipeline's own generation, the trained UNet swapped in."""

    def __init__(self, pipe, step: TrainStep, image, steps: int, folder: Path):
        from ..video import load_image

        self.pipe, self.step, self.steps, self.folder = pipe, step, steps, folder
        self.image = load_image(str(image))
        self.pipe.params.update({k: jax.tree.map(lambda p: p.astype(step.dtype), v)
                                 for k, v in pipe.params.items()})
        self.pipe.dtype = step.dtype

    def __call__(self, state, s: int) -> Path | None:
        from ..video import save_video

        c = self.step.config
        self.pipe.params["unet"] = jax.tree.map(lambda p: p.astype(self.step.dtype), self.step.trained_params(state))
        frames = self.pipe(self.image, height=c.height, width=c.width, num_frames=c.num_frames,
                           num_inference_steps=self.steps, seed=0, output_type="np").frames
        del self.pipe.params["unet"]
        if not _is_main():
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{s:06d}.gif"
        save_video(frames[0], str(path), fps=7)
        return path
