"""First call (trace + compile + run) vs repeat call (run only) of the whole jitted generation.

    python benchmarks/pipeline_timing.py [--model DIR_OR_REPO] [--height 64 --width 96 --frames 5 --steps 4]

Without --model it makes a tiny random checkpoint (svd-jax make-tiny) in a temporary folder, so it runs
offline on CPU in seconds; pass the real SVD-XT to time the real thing on an accelerator.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--decode-chunk-size", type=int, default=None)
    args = ap.parse_args()

    from svd_jax import StableVideoDiffusionPipeline
    from svd_jax.tiny import make_tiny_checkpoint

    model = args.model or make_tiny_checkpoint(tempfile.mkdtemp())
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, dtype=getattr(jnp, args.dtype))
    image = (np.random.default_rng(0).random((1, args.height, args.width, 3))).astype(np.float32)
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
              decode_chunk_size=args.decode_chunk_size, output_type="latent")
    times = []
    for seed in range(4):
        t0 = time.perf_counter()
        jax.block_until_ready(pipe(image, seed=seed, **kw).frames)
        times.append(time.perf_counter() - t0)
    print(f"{'tiny random' if args.model is None else model} checkpoint, {args.frames} frames "
          f"{args.width}x{args.height}, {args.steps} steps, {args.dtype}, {jax.devices()[0].platform}")
    print(f"  first call (compile + run): {times[0]:.2f} s")
    print(f"  repeat call (median of 3) : {sorted(times[1:])[1]:.3f} s   compiled {pipe.trace_count} time(s)")


if __name__ == "__main__":
    main()
