"""What a LoRA adapter costs SVD-XT generation, fused vs unfused, from XLA's cost analysis (abstract shapes: no
weights, nothing compiled).

    python benchmarks/lora_cost.py [--ranks 16,64 --frames 25 --height 576 --width 1024 --steps 25]

Fused (``pipe.load_lora_weights`` / ``fuse_lora``): the adapter is added into the UNet's kernels once on the
device, so a denoising step is the base step. Unfused (``unfuse_lora``): the program adds ``scale * (B @ A)ᵀ`` to
each adapted kernel itself: once per video in the one-program generation (before the denoising scan), once per
step in the step-by-step program that ``progress=True`` runs. The script prints the FLOPs of one UNet step (CFG
batch 2, bfloat16) without and with that addition, the addition alone, and the per-video totals, for the default
targets (to_q, to_k, to_v, to_out.0 of every attention) at each rank; and the bytes of the adapter and of the
adapted kernels' fused copies (what an unfused program holds besides the base weights).

FLOPs are those of the lowered program (plain attention, unsliced feed-forwards, as benchmarks/roofline.py counts
them: XLA's cost analysis counts a loop body once).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # benchmarks/ (run from anywhere)
from roofline import XLA_ATTENTION, lowered_flops, unet_args, unet_step  # noqa: E402

from svd_jax.configs import SVD_XT_UNET  # noqa: E402
from svd_jax.lora import DEFAULT_TARGETS, fuse, linear_modules, target_modules  # noqa: E402
from svd_jax.models import UNetSpatioTemporalConditionModel  # noqa: E402

S = jax.ShapeDtypeStruct
GIB = 2**30


def abstract_factors(params, rank: int) -> dict:
    """An abstract adapter of ``rank`` on the default targets (svd_jax.lora.factors' layout)."""
    shapes = linear_modules(params)
    mods = target_modules(params, DEFAULT_TARGETS)
    return {"A": {m: S((rank, shapes[m][0]), jnp.float32) for m in mods},
            "B": {m: S((shapes[m][1], rank), jnp.float32) for m in mods},
            "scale": {m: S((), jnp.float32) for m in mods}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    f, h, w = args.frames, args.height // 8, args.width // 8
    unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, dtype=jnp.bfloat16, options=XLA_ATTENTION)
    params = jax.tree.map(lambda s: S(s.shape, jnp.bfloat16), unet.init_params_abstract())
    step_args = unet_args(params, 2, f, h, w, jnp.bfloat16)
    base = lowered_flops(unet_step(unet), *step_args)
    mods = target_modules(params, DEFAULT_TARGETS)
    shapes = linear_modules(params)
    kernel_bytes = sum(np.prod(shapes[m]) for m in mods) * 2  # bfloat16 fused copies
    print(f"SVD-XT LoRA cost, {args.frames}x{args.height}x{args.width}, CFG (UNet batch 2), bfloat16, "
          f"{args.steps} steps; jax {jax.__version__}, {datetime.date.today()}")
    print(f"  command: python {' '.join(sys.argv)}")
    print(f"  targets {list(DEFAULT_TARGETS)}: {len(mods)} linear layers, {kernel_bytes / GIB:.2f} GiB of bf16 kernels "
          f"(an unfused program's fused copies)")
    print(f"  base UNet step: {base / 1e12:.3f} TFLOP")
    print(f"  {'rank':>4} | {'adapter':>8} {'MiB':>6} | {'merge GFLOP':>11} | {'step unfused':>12} {'ratio':>7} | "
          f"{'video fused':>11} {'video unfused':>13} {'ratio':>8}")
    for r in (int(x) for x in args.ranks.split(",")):
        lora = abstract_factors(params, r)
        n = sum(np.prod(x.shape) for x in jax.tree.leaves(lora))
        merge = lowered_flops(lambda p, lo: fuse(p, [lo]), params, lora)
        unfused = lowered_flops(lambda p, lo, *a: unet_step(unet)(fuse(p, [lo]), *a), params, lora, *step_args[1:])
        video_fused = args.steps * base
        video_unfused = video_fused + merge
        print(f"  {r:4d} | {n / 1e6:7.2f}M {n * 4 / 2**20:6.1f} | {merge / 1e9:11.2f} | {unfused / 1e12:9.3f} TF "
              f"{unfused / base:7.4f} | {video_fused / 1e12:8.2f} TF {video_unfused / 1e12:10.2f} TF "
              f"{video_unfused / video_fused:8.5f}")
    print("  step unfused: the step-by-step program (progress=True) adds the adapter every step; the one-program "
          "generation adds it once per video (video unfused). Fused: the base costs exactly.")


if __name__ == "__main__":
    main()
