"""The ``svd-jax`` command.

    svd-jax generate --image photo.png --output video.mp4 [--model REPO_OR_DIR --steps 25 --seed 0 ...]
    svd-jax make-tiny DIR        # a tiny random checkpoint in the hub layout, for offline smoke runs
    svd-jax convert SRC DST [--variant fp16 --dtype bfloat16]   # to the Flax layout, which loads faster and leaner
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .weights import FLAX_DTYPES

DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``svd-jax`` (subcommands ``generate``, ``make-tiny`` and ``convert``)."""
    p = argparse.ArgumentParser(prog="svd-jax", description="Stable Video Diffusion image-to-video in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="image -> video (.mp4 or .gif)")
    g.add_argument("--image", required=True, help="input image: a file path or an http(s) URL")
    g.add_argument("--output", default="video.mp4", help="output .mp4 or .gif (default: %(default)s)")
    g.add_argument("--model", default=os.environ.get("SVD_JAX_MODEL", DEFAULT_MODEL),
                   help="hub repo id or local diffusers-layout folder (default: $SVD_JAX_MODEL or %(default)s)")
    g.add_argument("--variant", default="auto",
                   help='weights variant: "fp16", "none", or "auto" (fp16 for the default hub model, else none)')
    g.add_argument("--dtype", default="auto", choices=["auto", *FLAX_DTYPES],
                   help="compute dtype (default auto: bfloat16 on TPU/GPU, float32 on CPU)")
    g.add_argument("--height", type=int, default=576)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--num-frames", type=int, default=None, help="default: the UNet config's num_frames")
    g.add_argument("--steps", type=int, default=25, help="denoising steps")
    g.add_argument("--min-guidance", type=float, default=1.0)
    g.add_argument("--max-guidance", type=float, default=3.0)
    g.add_argument("--fps", type=int, default=7, help="conditioning fps, and the frame rate of the output")
    g.add_argument("--motion-bucket-id", type=int, default=127)
    g.add_argument("--noise-aug-strength", type=float, default=0.02)
    g.add_argument("--decode-chunk-size", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    t = sub.add_parser("make-tiny", help="write a tiny random SVD checkpoint (hub layout) to DIR")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("convert", help="convert a diffusers checkpoint to the Flax layout (see svd_jax/convert.py)")
    from .convert import add_arguments  # costs nothing more: svd_jax/__init__ has imported jax and the models

    add_arguments(c)
    return p


def _generate(args) -> int:
    from .pipeline import StableVideoDiffusionPipeline
    from .video import export_to_gif, export_to_video, load_image

    variant = {"auto": "fp16" if args.model == DEFAULT_MODEL else None, "none": None}.get(args.variant, args.variant)
    image = load_image(args.image)
    t0 = time.perf_counter()
    pipe = StableVideoDiffusionPipeline.from_pretrained(args.model, dtype=args.dtype, variant=variant)
    t1 = time.perf_counter()
    frames = pipe(image, height=args.height, width=args.width, num_frames=args.num_frames,
                  num_inference_steps=args.steps, min_guidance_scale=args.min_guidance,
                  max_guidance_scale=args.max_guidance, fps=args.fps, motion_bucket_id=args.motion_bucket_id,
                  noise_aug_strength=args.noise_aug_strength, decode_chunk_size=args.decode_chunk_size,
                  seed=args.seed, output_type="np", progress=not args.quiet).frames
    t2 = time.perf_counter()
    writer = export_to_gif if args.output.lower().endswith(".gif") else export_to_video
    writer(frames[0], args.output, fps=args.fps)
    print(f"wrote {args.output}: {frames.shape[1]} frames {frames.shape[3]}x{frames.shape[2]}, {pipe.dtype.name} "
          f"(load {t1 - t0:.1f} s, generate incl. compile {t2 - t1:.1f} s)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point of ``svd-jax``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny":
        from .tiny import make_tiny_checkpoint

        print(make_tiny_checkpoint(args.dir, seed=args.seed))
        return 0
    if args.command == "convert":
        from .convert import run

        return run(args)
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
