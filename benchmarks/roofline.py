"""FLOPs of a whole SVD-XT generation from XLA's cost analysis, and how close this CPU runs the UNet to its matmul rate.

1. Cost analysis on abstract shapes (``jax.ShapeDtypeStruct``, no weights): one CFG denoising step of the UNet
   (2 x frames x 72x128 latents for 576x1024), VAE encode of the conditioning image, VAE decode of all frames and
   one CLIP ViT-H/14 forward; the whole generation = steps x UNet step + the rest.
2. Achieved FLOP/s here: the full-size UNet architecture (random weights, fp32) jitted at a small input
   (B=1, F=2, latent 16x32): its cost-analysis FLOPs / median wall time, next to a jitted fp32 2048^3 matmul
   timed in the same run (interleaved with the UNet, so load from other processes hits both alike).

    python benchmarks/roofline.py [--steps 25 --frames 25 --height 576 --width 1024 --repeats 5 --skip-cpu --ynn]

Part 1 lowers but never compiles the full-size programs (seconds, a few GB of RAM); its FLOPs are XLA's
HloCostAnalysis of the lowered module (for the small UNet, part 2 prints it beside the compiled module's,
they agree to ~0.1 %). The models run with attention forced to the plain "xla" backend and feed-forwards
unsliced (``ModelOptions``): the blockwise attention that "auto" picks at full size and the row-sliced
feed-forwards run in loops, whose bodies the cost analysis counts only once (107.9 instead of 154.0 TFLOP per
UNet step). Part 2 needs ~7 GB of RAM (the 1.5 B fp32 weights) and a
minute or two. As in ``unet_vs_diffusers.py``, XLA's CPU YNNPACK fusions are switched off unless
``--ynn`` is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__" and "--ynn" not in sys.argv:  # must be set before jax starts its CPU backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

import jax
import jax.numpy as jnp
import numpy as np

from svd_jax.configs import SVD_CLIP, SVD_VAE, SVD_XT_UNET
from svd_jax.models import (
    AutoencoderKLTemporalDecoder,
    CLIPVisionModelWithProjection,
    UNetSpatioTemporalConditionModel,
)
from svd_jax.options import ModelOptions

S = jax.ShapeDtypeStruct
F32 = jnp.float32
# Plain attention and unsliced feed-forwards: loops (blockwise attention, row-sliced feed-forwards) have their
# bodies counted once by the cost analysis (with the defaults: 107.9 instead of 154.0 TFLOP per UNet step).
XLA_ATTENTION = ModelOptions(attention="xla", forward_chunk_bytes=None)


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per computation
    return float(cost.get("flops", 0.0)) if cost else 0.0


def lowered_flops(fn, *args) -> float:
    """XLA cost-analysis FLOPs of ``jax.jit(fn)`` lowered at ``args`` (shapes only; nothing is compiled)."""
    return _flops(jax.jit(fn).lower(*args).cost_analysis())


def unet_step(unet):
    return lambda p, x, t, e, i: unet.apply({"params": p}, x, t, e, i).sample


def unet_args(params, b, f, h, w, dtype=F32):
    return (params, S((b, f, h, w, 8), dtype), S((), F32), S((b, 1, 1024), dtype), S((b, 3), dtype))


def generation_flops(args):
    """{component: FLOPs} of one SVD-XT video with CFG at args' size, and the whole generation's total."""
    f, h, w = args.frames, args.height // 8, args.width // 8
    unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, options=XLA_ATTENTION)
    vae = AutoencoderKLTemporalDecoder.from_config(SVD_VAE, options=XLA_ATTENTION)
    clip = CLIPVisionModelWithProjection.from_config(SVD_CLIP, options=XLA_ATTENTION)
    up, vp, cp = unet.init_params_abstract(), vae.init_params_abstract(), clip.init_params_abstract()
    parts = {
        "UNet step (CFG batch 2)": lowered_flops(unet_step(unet), *unet_args(up, 2, f, h, w)),
        "VAE encode (1 image)": lowered_flops(lambda p, x: vae.apply({"params": p}, x, method="encode").mean,
                                              vp, S((1, args.height, args.width, 3), F32)),
        f"VAE decode ({f} frames)": lowered_flops(
            lambda p, z: vae.apply({"params": p}, z, num_frames=f, method="decode"), vp, S((f, h, w, 4), F32)),
        "CLIP ViT-H/14 (1 image)": lowered_flops(lambda p, x: clip.apply({"params": p}, x).image_embeds,
                                                 cp, S((1, 224, 224, 3), F32)),
    }
    total = args.steps * parts["UNet step (CFG batch 2)"] + sum(v for k, v in parts.items() if not k.startswith("UNet"))
    return parts, total


def random_params(abstract, seed=0):
    """Random weights for an abstract tree: N(0, 1/fan_in) for kernels, 1 + N(0, 0.01) for vectors (norm scales
    and biases), so activations stay finite through the 1.5 B-parameter net."""
    # numpy, leaf by leaf, straight onto the device: threefry (flax's init) takes minutes for 1.5 B values on
    # this CPU, and one leaf at a time keeps the peak at one copy of the weights.
    rng = np.random.default_rng(seed)

    def one(s):
        v = rng.standard_normal(s.shape, np.float32)
        v = v / np.sqrt(np.prod(s.shape[:-1])) if v.ndim > 1 else 1 + 0.1 * v
        return jax.device_put(v.astype(s.dtype))

    return jax.tree_util.tree_map(one, abstract)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_cpu(args):
    """Time the small full-architecture UNet forward and a big matmul; their cost-analysis FLOPs and medians."""
    b, f, h, w = 1, 2, 16, 32
    # attention "xla": what "auto" picks at this size anyway; fixed so FLOPs and run match
    unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, options=XLA_ATTENTION)
    x = jax.random.normal(jax.random.PRNGKey(1), (b, f, h, w, 8), F32)
    e = jax.random.normal(jax.random.PRNGKey(2), (b, 1, 1024), F32)
    ids = jnp.tile(jnp.array([[6, 127, 0.02]], F32), (b, 1))
    t = jnp.float32(0.8)
    t0 = time.perf_counter()
    params = random_params(unet.init_params_abstract())
    t_init = time.perf_counter() - t0
    lowered = jax.jit(unet_step(unet)).lower(params, x, t, e, ids)
    t0 = time.perf_counter()
    fwd = lowered.compile()
    t_compile = time.perf_counter() - t0
    flops_lo, flops = _flops(lowered.cost_analysis()), _flops(fwd.cost_analysis())

    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(3), (n, n), F32)
    bm = jax.random.normal(jax.random.PRNGKey(4), (n, n), F32)
    mm = jax.jit(jnp.matmul).lower(a, bm).compile()
    mm_flops = _flops(mm.cost_analysis()) or 2.0 * n ** 3
    k = 8  # matmuls per timed sample: one takes ~0.15 s here, too short to time alone on a shared machine

    out = fwd(params, x, t, e, ids)
    if not bool(jnp.isfinite(out).all()):  # inf/NaN arithmetic could run at another speed than real numbers
        print("  warning: the random-weight UNet output is not finite")
    run_unet = lambda: fwd(params, x, t, e, ids).block_until_ready()
    run_mm = lambda: [mm(a, bm) for _ in range(k)][-1].block_until_ready()
    run_mm()  # warm-up (the UNet ran above)
    tu, tm = [], []
    for _ in range(args.repeats):  # interleaved: a burst of load from other processes lands on both
        tu.append(_timed(run_unet))
        tm.append(_timed(run_mm) / k)
    return dict(flops_lo=flops_lo, flops=flops, t_unet=statistics.median(tu), mm_flops=mm_flops,
                t_mm=statistics.median(tm), t_compile=t_compile, t_init=t_init, shape=(b, f, h, w), n=n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25, help="denoising steps")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each program (median)")
    ap.add_argument("--skip-cpu", action="store_true", help="only the cost analysis; no weights, nothing run")
    ap.add_argument("--ynn", action="store_true", help="keep XLA's default CPU YNNPACK fusions")
    args = ap.parse_args()

    print(f"SVD-XT, {args.frames} frames {args.width}x{args.height}, CFG, {args.steps} steps; XLA cost analysis "
          f"(jax {jax.__version__}), attention backend 'xla'")
    parts, total = generation_flops(args)
    for name, fl in parts.items():
        print(f"  {name:<26}: {fl / 1e12:10.2f} TFLOP")
    print(f"  {'whole generation':<26}: {total / 1e12:10.2f} TFLOP  "
          f"(= {args.steps} UNet steps + VAE encode + VAE decode + CLIP)")
    sys.stdout.flush()
    if args.skip_cpu:
        return

    r = measure_cpu(args)
    unet_rate, mm_rate = r["flops"] / r["t_unet"], r["mm_flops"] / r["t_mm"]
    b, f, h, w = r["shape"]
    print(f"Achieved FLOP/s on this CPU ({os.cpu_count()} cores, {jax.devices()[0].platform}), fp32, median of "
          f"{args.repeats}")
    print(f"  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"  UNet fwd B={b} F={f} latent {h}x{w}: {r['flops'] / 1e9:8.1f} GFLOP (lowered {r['flops_lo'] / 1e9:.1f}) "
          f"in {r['t_unet'] * 1e3:8.1f} ms -> {unet_rate / 1e9:7.1f} GFLOP/s  "
          f"(weights {r['t_init']:.1f} s, compile {r['t_compile']:.1f} s)")
    print(f"  matmul {r['n']}^3           : {r['mm_flops'] / 1e9:8.1f} GFLOP in {r['t_mm'] * 1e3:8.1f} ms -> "
          f"{mm_rate / 1e9:7.1f} GFLOP/s")
    print(f"  UNet / matmul FLOP/s     : {unet_rate / mm_rate:8.1%}  (goal >= 50%)")
    print(f"  whole generation at the UNet's rate here: {total / unet_rate / 3600:.1f} h")


if __name__ == "__main__":
    main()
