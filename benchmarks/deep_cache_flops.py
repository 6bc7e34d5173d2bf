"""UNet FLOPs per SVD-XT video with step caching (``pipe(..., cache_interval=N, cache_branch=b)``), from XLA's cost
analysis of the lowered UNet (abstract shapes: no weights, nothing compiled).

    python benchmarks/deep_cache_flops.py [--frames 25 --height 576 --width 1024 --steps 25 --branches 1,2]

A full step runs the whole UNet (CFG batch 2); a cached step only the ``b`` shallowest down and up blocks on the
deep features kept from the last full step. With interval N, steps 0, N, 2N, ... are full: ceil(steps / N) full
and the rest cached. Quality is not measured here (no real weights on this machine).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # benchmarks/
from roofline import XLA_ATTENTION, lowered_flops, unet_args  # noqa: E402

from svd_jax.configs import SVD_XT_UNET  # noqa: E402
from svd_jax.models import UNetSpatioTemporalConditionModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--branches", default="1,2")
    ap.add_argument("--intervals", default="1,2,3,5")
    args = ap.parse_args()
    f, h, w = args.frames, args.height // 8, args.width // 8
    unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, dtype=jnp.bfloat16, options=XLA_ATTENTION)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), unet.init_params_abstract())
    p, x, t, e, i = unet_args(params, 2, f, h, w, jnp.bfloat16)
    full = lowered_flops(lambda p, x, t, e, i: unet.apply({"params": p}, x, t, e, i).sample, p, x, t, e, i)
    print(f"SVD-XT UNet FLOPs with step caching, {f}x{args.height}x{args.width}, CFG (batch 2), bfloat16, "
          f"{args.steps} steps; jax {jax.__version__}, {datetime.date.today()}")
    print(f"  command: python {' '.join(sys.argv)}")
    print(f"  full step: {full / 1e12:.2f} TFLOP")
    intervals = [int(n) for n in args.intervals.split(",")]
    print(f"  {'branch':>6} {'cached step TFLOP':>17} {'of full':>7} | "
          + " | ".join(f"N={n}: video TFLOP (vs exact)" for n in intervals))
    for b in (int(v) for v in args.branches.split(",")):
        deep = jax.eval_shape(lambda p, x, t, e, i: unet.apply({"params": p}, x, t, e, i, cache_branch=b).deep,
                              p, x, t, e, i)
        cached = lowered_flops(lambda p, x, t, e, i, d: unet.apply({"params": p}, x, t, e, i, cache_branch=b,
                                                                   deep_features=d).sample, p, x, t, e, i, deep)
        cells = []
        for n in intervals:
            n_full = math.ceil(args.steps / n)
            video = n_full * full + (args.steps - n_full) * cached
            cells.append(f"{video / 1e12:8.1f} ({video / (args.steps * full):.2f}x)")
        print(f"  {b:6d} {cached / 1e12:17.2f} {cached / full:7.3f} | " + " | ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
