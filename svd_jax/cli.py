"""The ``svd-jax`` command.

    svd-jax generate --image photo.png --output video.mp4 [--model REPO_OR_DIR --steps 25 --seed 0 ...]
    svd-jax make-tiny DIR        # a tiny random checkpoint in the hub layout, for offline smoke runs
    svd-jax convert SRC DST [--variant fp16 --dtype bfloat16]   # to the Flax layout, which loads faster and leaner
    svd-jax train --model REPO_OR_DIR --data VIDEOS_OR_JSONL --output DIR --num-frames 14 --height 320 --width 576
                  --max-steps 1000 [--trainable temporal --save-every 500 --resume ...]   # fine-tune the UNet

Failures end in one ``svd-jax <command>: error: ...`` line naming the flag (exit status 2 for bad arguments, 1 for
a failure while running, 130 when interrupted); ``--debug`` (or ``SVD_JAX_DEBUG=1``) shows the traceback instead.
Every argument of ``generate`` is checked before anything is loaded. This module imports neither jax nor the
models at import time, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .options import REMAT_POLICIES, SCHEDULER_NAMES  # no jax import: the CLI parses arguments before jax starts

DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"
DTYPES = ("float32", "bfloat16", "float16")  # the weights' dtypes (svd_jax.weights.FLAX_DTYPES; tested equal)
DEBUG_ENV = "SVD_JAX_DEBUG"
URL_SCHEMES = ("http", "https")


class UsageError(Exception):
    """A command-line argument that cannot work; the message names the flag."""


def _formatter(prog):
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """The converter's arguments (shared by ``python -m convert`` and ``svd-jax convert``)."""
    p.add_argument("src", help="hub repo id, local diffusers pipeline folder, or one component folder")
    p.add_argument("dst", help="output folder (absent or empty)")
    p.add_argument("--variant", default=None,
                   help='weights variant to read, e.g. "fp16" (default: the default weights)')
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="dtype of the converted weights (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder")
    p.add_argument("--local-files-only", action="store_true", help="use the hub cache only, no network")
    p.add_argument("--configs", default=None, metavar="DIR",
                   help="for a single file: a folder with unet/, vae/, image_encoder/ config.json (default: SVD-XT's "
                        "configs)")
    p.add_argument("--to", default=None, choices=["diffusers", "flax"],
                   help="output layout: for a single .safetensors file (Stability's svd_xt.safetensors) diffusers "
                        "(default) or flax; for a diffusers folder or repo only flax")
    p.add_argument("--quiet", action="store_true", help="no per-component lines on stderr")
    p.add_argument("--debug", action="store_true", help=f"show tracebacks (also ${DEBUG_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``svd-jax`` (subcommands ``generate``, ``make-tiny`` and ``convert``)."""
    p = argparse.ArgumentParser(prog="svd-jax", description="Stable Video Diffusion image-to-video in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="image -> video (.mp4 or .gif)", formatter_class=_formatter)
    g.add_argument("--image", required=True, help="input image: a file path or an http(s) URL")
    g.add_argument("--output", default="video.mp4", help="output .mp4 or .gif")
    g.add_argument("--model", default=os.environ.get("SVD_JAX_MODEL", DEFAULT_MODEL),
                   help="hub repo id, local diffusers-layout folder, or one of Stability's single files "
                        "(svd_xt.safetensors) ($SVD_JAX_MODEL overrides the default)")
    g.add_argument("--configs", default=None, metavar="DIR",
                   help="with a .safetensors --model: a folder with unet/, vae/, image_encoder/ config.json (e.g. a "
                        "diffusers pipeline folder) for other architectures than SVD-XT's")
    g.add_argument("--variant", default="auto",
                   help='weights variant: "fp16", "none", or "auto" (fp16 for the default hub model, else none)')
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype (auto: bfloat16 on TPU/GPU, float32 on CPU)")
    g.add_argument("--height", type=int, default=576, help="frame height, a multiple of 8")
    g.add_argument("--width", type=int, default=1024, help="frame width, a multiple of 8")
    g.add_argument("--num-frames", type=int, default=None, help="frames (default: the UNet config's num_frames)")
    g.add_argument("--steps", type=int, default=25, help="denoising steps")
    g.add_argument("--scheduler", default="euler", choices=list(SCHEDULER_NAMES),
                   help="sampler: euler (the model's EulerDiscrete), edm_euler, or edm_dpmsolver++ (DPM-Solver++ 2M, "
                        "a second-order solver meant for fewer steps, e.g. --steps 12)")
    g.add_argument("--min-guidance", type=float, default=1.0, help="CFG scale of the first frame")
    g.add_argument("--max-guidance", type=float, default=3.0, help="CFG scale of the last frame (<= 1: CFG off)")
    g.add_argument("--fps", type=int, default=7, help="conditioning fps, and the frame rate of the output")
    g.add_argument("--motion-bucket-id", type=int, default=127, help="motion conditioning (trained on 0..255)")
    g.add_argument("--noise-aug-strength", type=float, default=0.02, help="noise added to the conditioning image")
    g.add_argument("--decode-chunk-size", type=int, default=None, help="frames decoded at once (default: all)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA adapter (peft folder, diffusers-style .safetensors file or hub repo id) fused with "
                        "weight SCALE (default 1); repeat for several")
    g.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    g.add_argument("--debug", action="store_true", help=f"show tracebacks (also ${DEBUG_ENV}=1)")
    t = sub.add_parser("make-tiny", help="write a tiny random SVD checkpoint (hub layout) to DIR",
                       formatter_class=_formatter)
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    t.add_argument("--debug", action="store_true", help=f"show tracebacks (also ${DEBUG_ENV}=1)")
    c = sub.add_parser("convert", help="convert a diffusers checkpoint to the Flax layout (see svd_jax/convert.py)",
                       formatter_class=_formatter)
    add_convert_arguments(c)
    add_train_arguments(sub.add_parser("train", help="fine-tune the UNet on video files (svd_jax/training/)",
                                       formatter_class=_formatter))
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``svd-jax train`` (defaults: svd_jax.training.TrainConfig's)."""
    p.add_argument("--model", default=os.environ.get("SVD_JAX_MODEL", DEFAULT_MODEL),
                   help="base pipeline: hub repo id or local diffusers-layout folder")
    p.add_argument("--variant", default="none", help='weights variant to read: "fp16" or "none"')
    p.add_argument("--data", required=True, help="folder of videos (recursive) or a .jsonl manifest "
                                                 '({"path": ..., "fps": ..., "motion_bucket_id": ...} per line)')
    p.add_argument("--output", required=True, help="run folder: metrics.jsonl, checkpoints/, the exported pipeline")
    p.add_argument("--num-frames", type=int, default=14, help="frames per clip")
    p.add_argument("--height", type=int, default=320, help="clip height, a multiple of 8")
    p.add_argument("--width", type=int, default=576, help="clip width, a multiple of 8")
    p.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame of a video")
    p.add_argument("--max-steps", type=int, default=1000, help="train steps (micro-batches) to reach")
    p.add_argument("--batch-size", type=int, default=1, help="clips per step, over all devices and hosts")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optax optimizer")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="decoupled weight decay")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"], help="after the warmup")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, in optimizer updates")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm clipping (<= 0: off)")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches averaged per update")
    p.add_argument("--ema-decay", type=float, default=None, help="keep (and export) an EMA of the weights")
    p.add_argument("--trainable", default="full", choices=["full", "temporal", "lora"],
                   help="what trains: the whole UNet, its temporal layers, or a new LoRA adapter (saved as a peft "
                        "folder in --output)")
    p.add_argument("--lora-rank", type=int, default=16, help="--trainable lora: the adapter's rank r")
    p.add_argument("--lora-alpha", type=float, default=None, help="--trainable lora: lora_alpha (default: the rank)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="MODULE",
                   help="--trainable lora: the linear layers adapted, peft's target_modules (a name or a name's "
                        "end; default: to_q to_k to_v to_out.0 of every attention)")
    p.add_argument("--export-fused", action="store_true",
                   help="--trainable lora: also export the pipeline with the adapter fused into the UNet")
    p.add_argument("--remat", default="none", choices=list(REMAT_POLICIES),
                   help="what the backward pass recomputes to save memory")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype (auto: bfloat16 on TPU/GPU, float32 on CPU); weights stay float32")
    p.add_argument("--seed", type=int, default=0, help="fixes data order, clips and noise")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every n steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--mesh", default=None, metavar="DATAxSPACE",
                   help="train on a device mesh, e.g. 8x1 (clips over data) or 4x2 (each clip's height over 2), or 1x1 "
                        "(one device); "
                        "default with several devices: clips over gcd(batch size, devices) of them, each clip's "
                        "height over the rest; weights FSDP-split over all")
    p.add_argument("--sample-image", default=None, help="make a sample video from this image")
    p.add_argument("--sample-every", type=int, default=None, help="... every n steps (and at the end)")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode one clip per video once, then train the UNet on those latents")
    p.add_argument("--no-export", action="store_true", help="do not write the pipeline folder at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help=f"show tracebacks (also ${DEBUG_ENV}=1)")


def _warn(msg: str) -> None:
    print(f"svd-jax generate: warning: {msg}", file=sys.stderr)


def check_generate_args(args) -> None:
    """UsageError (naming the flag) for any ``generate`` argument that cannot work; warnings for ones that work
    but probably not as meant. Cheap: reads no weights and imports nothing heavy."""
    def at_least(flag, value, low):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}; got {value}")

    for flag, value in (("--height", args.height), ("--width", args.width)):
        at_least(flag, value, 8)
        if value % 8:
            raise UsageError(f"{flag} must be a multiple of 8; got {value} (e.g. {value // 8 * 8})")
    at_least("--steps", args.steps, 1)
    at_least("--num-frames", args.num_frames, 1)
    at_least("--decode-chunk-size", args.decode_chunk_size, 1)
    at_least("--fps", args.fps, 1)
    for flag, value in (("--min-guidance", args.min_guidance), ("--max-guidance", args.max_guidance),
                        ("--noise-aug-strength", args.noise_aug_strength)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number; got {value}")
    if args.noise_aug_strength < 0:
        raise UsageError(f"--noise-aug-strength must be >= 0; got {args.noise_aug_strength}")
    if not 0 <= args.motion_bucket_id <= 255:
        _warn(f"--motion-bucket-id {args.motion_bucket_id} is outside the trained range 0..255")
    if args.min_guidance > args.max_guidance:
        what = ("CFG is off (--max-guidance <= 1), so --min-guidance has no effect" if args.max_guidance <= 1 else
                "the guidance decreases from the first frame to the last")
        _warn(f"--min-guidance {args.min_guidance} > --max-guidance {args.max_guidance}: {what}")
    if args.configs is not None and not os.path.isdir(os.path.expanduser(args.configs)):
        raise UsageError(f"--configs {args.configs}: no such folder")
    if "://" in args.image:
        scheme = args.image.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            raise UsageError(f"--image {args.image}: unsupported URL scheme {scheme!r}; use a local file or an "
                             f"{'/'.join(URL_SCHEMES)} URL")
    elif not os.path.isfile(os.path.expanduser(args.image)):
        raise UsageError(f"--image {args.image}: no such file")
    from .video import check_fps, check_output_path

    for check in (lambda: check_output_path(args.output), lambda: check_fps(args.fps, args.output)):
        try:
            check()
        except ValueError as e:  # the messages start with the argument's name: "output ...", "fps ..."
            raise UsageError(f"--{e}") from None
    from .weights.locate import looks_like_local_path

    model = os.path.expanduser(str(args.model))
    if model.endswith(".safetensors"):
        if not os.path.isfile(model):
            raise UsageError(f"--model {args.model}: no such file")
    elif not os.path.isdir(model) and (looks_like_local_path(args.model) or os.path.exists(model)):
        raise UsageError(f"--model {args.model}: no such folder (and not a hub repo id 'owner/name', nor a "
                         ".safetensors single file)")


def parse_lora(spec: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]`` -> (PATH, SCALE); a trailing ``:<number>`` is the scale (default 1.0)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(scale):
            raise UsageError(f"--lora {spec}: the scale must be a finite number; got {tail}")
        return head, scale
    return spec, 1.0


def _check_loras(args) -> list:
    """The adapters of ``--lora``, read (small files) before any model weight: [(path, scale, LoRA)]."""
    from .lora import LoRAError, load_lora

    out = []
    for spec in args.lora:
        path, scale = parse_lora(spec)
        try:
            out.append((path, scale, load_lora(path)))
        except LoRAError as e:
            raise UsageError(f"--lora {spec}: {e}") from None
    return out


def _status(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def _load(args, variant, dtype):
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from .pipeline import StableVideoDiffusionPipeline
    from .single_file import looks_like_single_file

    if looks_like_single_file(args.model):  # Stability's original svd_xt.safetensors
        return StableVideoDiffusionPipeline.from_single_file(os.path.expanduser(args.model), dtype=dtype,
                                                             scheduler=args.scheduler, configs=args.configs)
    try:
        return StableVideoDiffusionPipeline.from_pretrained(args.model, dtype=dtype, variant=variant,
                                                            scheduler=args.scheduler)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise RuntimeError(f"--model {args.model}: not in the local hub cache, and the hub cannot be reached "
                           f"({type(e).__name__}); download it once while online, or pass --model /path/to/a/"
                           "local/pipeline/folder") from e


def _cpu_defaults(args) -> None:
    """XLA:CPU's faster settings for svd-jax, before jax starts (svd_jax/xla_defaults.py; SVD_JAX_CPU_DEFAULTS=0
    keeps XLA's)."""
    from .xla_defaults import apply_cpu_defaults

    apply_cpu_defaults()


def _generate(args) -> int:
    check_generate_args(args)
    _cpu_defaults(args)
    variant = {"auto": "fp16" if args.model == DEFAULT_MODEL else None, "none": None}.get(args.variant, args.variant)
    from .compile_cache import enable_compile_cache
    from .video import load_image, save_video

    image = load_image(args.image)
    loras = _check_loras(args)
    t0 = time.perf_counter()
    pipe = _load(args, variant, args.dtype)
    for path, scale, lora in loras:  # read once, before the model loaded
        name = pipe.load_lora_weights(lora, scale=scale)
        _status(args, f"LoRA {path} fused with weight {scale:g} ({name})")
    t1 = time.perf_counter()
    cache = enable_compile_cache()
    _status(args, "generating; the first run with these settings compiles the program (seconds for small sizes, "
                  "minutes at full size)" + (f", later runs read it from the cache in {cache}" if cache else ""))
    frames = pipe(image, height=args.height, width=args.width, num_frames=args.num_frames,
                  num_inference_steps=args.steps, min_guidance_scale=args.min_guidance,
                  max_guidance_scale=args.max_guidance, fps=args.fps, motion_bucket_id=args.motion_bucket_id,
                  noise_aug_strength=args.noise_aug_strength, decode_chunk_size=args.decode_chunk_size,
                  seed=args.seed, output_type="np", progress=not args.quiet).frames
    t2 = time.perf_counter()
    save_video(frames[0], args.output, fps=args.fps)
    _status(args, f"wrote {args.output}: {frames.shape[1]} frames {frames.shape[3]}x{frames.shape[2]}, "
                  f"{pipe.dtype.name} (load {t1 - t0:.1f} s, generate incl. compile {t2 - t1:.1f} s)")
    return 0


def _make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir, seed=args.seed))
    return 0


def _convert(args) -> int:
    from .convert import run

    return run(args)


def check_train_args(args):
    """-> the TrainConfig of ``svd-jax train``'s arguments; UsageError naming the flag for one that cannot work.
    Imports no jax."""
    from .training.config import TrainConfig, TrainConfigError

    for flag in ("num_frames", "max_steps", "batch_size", "grad_accum_steps", "frame_stride", "keep_checkpoints"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    for flag in ("save_every", "sample_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.sample_every is not None and args.sample_image is None:
        raise UsageError("--sample-every needs --sample-image")
    if args.sample_image is not None and not os.path.isfile(args.sample_image):
        raise UsageError(f"--sample-image {args.sample_image}: no such file")
    if not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such folder or manifest")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is a file; pass a folder")
    if args.mesh is not None:
        try:
            data, space = (int(x) for x in args.mesh.lower().split("x"))
            assert data >= 1 and space >= 1
        except (ValueError, AssertionError):
            raise UsageError(f"--mesh must be DATAxSPACE with positive sizes, e.g. 8x1; got {args.mesh!r}") from None
    fields = dict(num_frames=args.num_frames, height=args.height, width=args.width, batch_size=args.batch_size,
                  max_steps=args.max_steps, learning_rate=args.learning_rate, optimizer=args.optimizer,
                  weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
                  max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
                  grad_accum_steps=args.grad_accum_steps, ema_decay=args.ema_decay, trainable=args.trainable,
                  remat=args.remat, dtype=args.dtype, seed=args.seed, lora_rank=args.lora_rank,
                  lora_alpha=args.lora_alpha)
    if args.lora_targets is not None:
        fields["lora_targets"] = tuple(args.lora_targets)
    if args.trainable != "lora" and (args.lora_targets is not None or args.lora_alpha is not None
                                     or args.export_fused):
        raise UsageError("--lora-alpha, --lora-targets and --export-fused need --trainable lora")
    try:
        return TrainConfig(**fields)
    except TrainConfigError as e:  # name the flag, not the field
        msg = str(e)
        for name in fields:
            msg = msg.replace(name, "--" + name.replace("_", "-"), 1) if msg.startswith(name) else msg
        raise UsageError(msg) from None


def _train(args) -> int:
    config = check_train_args(args)
    _cpu_defaults(args)
    import jax

    from .training.trainer import train

    mesh = None
    n = len(jax.devices())
    if args.mesh is not None or n > 1:
        from .sharding import make_mesh

        if args.mesh:
            data, space = (int(x) for x in args.mesh.lower().split("x"))
        else:  # clips over as many devices as the batch allows, each clip's height over the rest
            data = math.gcd(config.batch_size, n)
            space = n // data
        if data * space not in (1, n):
            raise UsageError(f"--mesh {args.mesh}: {data} x {space} devices, but there are {n} (1x1: one device)")
        if config.batch_size % data:
            raise UsageError(f"--batch-size {config.batch_size} must be a multiple of the mesh's data axis ({data})")
        mesh = make_mesh(data=data, space=space) if data * space > 1 else None
    result = train(args.model, args.data, args.output, config, save_every=args.save_every,
                   keep_checkpoints=args.keep_checkpoints, resume=args.resume, frame_stride=args.frame_stride,
                   mesh=mesh, variant=None if args.variant == "none" else args.variant,
                   sample_every=args.sample_every, sample_image=args.sample_image, export=not args.no_export,
                   cache_latents=args.cache_latents, export_fused=args.export_fused,
                   progress=not args.quiet)
    for path, reason in result.skipped:
        print(f"svd-jax train: skipped {path}: {reason}", file=sys.stderr)
    done = f"step {result.step}" + (f", loss {result.metrics['loss']:.4f}" if result.metrics else "")
    what = "the LoRA adapter" if config.trainable == "lora" and not args.export_fused else "the pipeline"
    where = f"; exported {what} to {result.exported}" if result.exported else ""
    print(f"svd-jax train: {done}{where}", file=sys.stderr)
    return 0


COMMANDS = {"generate": _generate, "make-tiny": _make_tiny, "convert": _convert, "train": _train}


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (OSError, RuntimeError, ValueError)) and type(e).__module__ == "builtins":
        return msg
    if type(e).__name__ == "CheckpointError":
        return msg
    return f"{type(e).__name__}: {msg}"


def main(argv=None) -> int:
    """Entry point of ``svd-jax``; returns the exit code."""
    args = build_parser().parse_args(argv)  # argparse's own usage errors exit with status 2
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    where = f"svd-jax {args.command}"
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line reports every failure in one line
        if debug:
            raise
        print(f"{where}: error: {_one_line(e)} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
