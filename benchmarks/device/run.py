"""svd-jax vs diffusers on one accelerator: SVD-XT at full size, random weights made on the device, one table.

    python benchmarks/device/run.py                 # a GPU machine with jax[cuda] + torch (+ a diffusers wheel)
    python benchmarks/device/run.py --tiny          # the same code path on CPU with the tiny configs (the tests)

Nothing is downloaded: the networks are built from svd_jax/configs.py's SVD-XT configs and filled with random
weights on the device (svd-jax: bfloat16; diffusers: float16 with PyTorch SDPA attention), so the two sides
compute the same shapes, not the same numbers. Each row is one generation setting (25x576x1024, CFG, one
video): cold seconds (svd-jax: compile + first run; diffusers: first run), warm seconds per video (median of
``--repeats``), the compiled program's peak memory (svd-jax, XLA's memory analysis) or torch's
``max_memory_allocated`` (diffusers), and the ratio to diffusers' time for the same sampler. Per-step and fixed
(CLIP + VAE encode + decode) times are derived from the Euler-25 and DPM-Solver++-12 rows of one side:
step = (t25 - t12) / 13, fixed = t25 - 25 step.

Rows run in this order and stop when ``--budget-s`` (default 420 s) has passed, so the script ends within about 8
minutes on the first machine that has an accelerator; a skipped row says so. ``--torch-compile`` adds diffusers'
UNet under ``torch.compile`` last. ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set so both frameworks share the
device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch needs the memory jax would pre-take

GIB = 2**30


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU (what the test suite runs)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default 25; --tiny 3)")
    ap.add_argument("--dpm-steps", type=int, default=None, help="DPM-Solver++ steps (default 12; --tiny 2)")
    ap.add_argument("--backends", default="auto,cudnn,blockwise", help="svd-jax attention backends")
    ap.add_argument("--repeats", type=int, default=None, help="warm runs per row (default 3; --tiny 1)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new row after this many seconds")
    ap.add_argument("--no-torch", action="store_true", help="svd-jax rows only")
    ap.add_argument("--torch-compile", action="store_true", help="also diffusers with torch.compile(unet)")
    a = ap.parse_args(argv)
    tiny = a.tiny
    a.frames = a.frames or (4 if tiny else 25)
    a.height = a.height or (64 if tiny else 576)
    a.width = a.width or (96 if tiny else 1024)
    a.steps = a.steps or (3 if tiny else 25)
    a.dpm_steps = a.dpm_steps or (2 if tiny else 12)
    a.repeats = a.repeats or (1 if tiny else 3)
    return a


def random_params(module, key, dtype):
    """Random parameters of ``module`` made on the default device (kernels scaled by fan-in, norm scales near 1,
    biases small), in ``dtype``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    flat = traverse_util.flatten_dict(module.init_params_abstract())
    paths = sorted(flat)

    def make(key):
        keys = jax.random.split(key, len(paths))
        out = {}
        for k, p in zip(keys, paths):
            shape = flat[p].shape
            n = jax.random.normal(k, shape, jnp.float32)
            if p[-1] == "kernel":
                n = n / float(np.sqrt(max(1, int(np.prod(shape[:-1])))))
            elif p[-1] == "scale":
                n = 1.0 + 0.1 * n
            elif p[-1] in ("bias", "embedding"):
                n = 0.05 * n
            out[p] = n.astype(dtype)
        return traverse_util.unflatten_dict(out)

    return jax.jit(make)(key)


def jax_pipeline(tiny: bool, dtype, attention: str, scheduler: str):
    import jax

    from svd_jax.configs import SVD_CLIP, SVD_SCHEDULER, SVD_VAE, SVD_XT_UNET, TINY_CLIP, TINY_UNET, TINY_VAE
    from svd_jax.models import (
        AutoencoderKLTemporalDecoder,
        CLIPVisionModelWithProjection,
        UNetSpatioTemporalConditionModel,
    )
    from svd_jax.pipeline import StableVideoDiffusionPipeline
    from svd_jax.samplers import make_scheduler
    from svd_jax.scheduler import EulerScheduler

    cfgs = (TINY_UNET, TINY_VAE, TINY_CLIP) if tiny else (SVD_XT_UNET, SVD_VAE, SVD_CLIP)
    mods = (UNetSpatioTemporalConditionModel.from_config(cfgs[0], dtype=dtype),
            AutoencoderKLTemporalDecoder.from_config(cfgs[1], dtype=dtype),
            CLIPVisionModelWithProjection.from_config(cfgs[2], dtype=dtype))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {n: random_params(m, k, dtype) for n, m, k in zip(("unet", "vae", "image_encoder"), mods, keys)}
    base = EulerScheduler.from_config(SVD_SCHEDULER)
    return StableVideoDiffusionPipeline(*mods, make_scheduler(scheduler, base), params, dtype, attention=attention)


def run_jax(args, attention: str, scheduler: str, steps: int, image) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    pipe = jax_pipeline(args.tiny, dtype, attention, scheduler)
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=steps,
              decode_chunk_size=args.frames, output_type="np", seed=0)
    t0 = time.perf_counter()
    compiled = pipe.compile(**kw)
    jax.block_until_ready(pipe(image, **kw).frames)
    cold = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        frames = pipe(image, **kw).frames
        times.append(time.perf_counter() - t)
    m = compiled.memory_analysis()
    peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            if m is not None else None)
    assert np.isfinite(frames).all()
    return dict(cold=cold, warm=statistics.median(times), peak=peak)


def torch_pipeline(tiny: bool, scheduler: str, device: str, dtype):
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EDMDPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from svd_jax.configs import (
        CLIP_PROCESSOR_CONFIG,
        SVD_CLIP,
        SVD_SCHEDULER,
        SVD_VAE,
        SVD_XT_UNET,
        TINY_CLIP,
        TINY_UNET,
        TINY_VAE,
    )

    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_") and k != "architectures"}
    cu, cv, cc = (TINY_UNET, TINY_VAE, TINY_CLIP) if tiny else (SVD_XT_UNET, SVD_VAE, SVD_CLIP)
    with torch.device(device):  # random init on the device itself
        unet = UNetSpatioTemporalConditionModel(**strip(cu))
        vae = AutoencoderKLTemporalDecoder(**strip(cv))
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**strip(cc)))
    if scheduler == "euler":
        sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    else:
        sched = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=700.0, sigma_data=1.0,
                                               prediction_type="v_prediction")
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=enc, unet=unet, scheduler=sched,
                                        feature_extractor=CLIPImageProcessor(**strip(CLIP_PROCESSOR_CONFIG)))
    return pipe.to(device=device, dtype=dtype)


def run_torch(args, scheduler: str, steps: int, image, compile_unet: bool = False) -> dict:
    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.float16
    pipe = torch_pipeline(args.tiny, scheduler, device, dtype)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=steps,
              decode_chunk_size=args.frames, output_type="np")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        t0 = time.perf_counter()
        pipe(image, generator=torch.Generator(device).manual_seed(0), **kw)
        sync()
        cold = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            pipe(image, generator=torch.Generator(device).manual_seed(0), **kw)
            sync()
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(cold=cold, warm=statistics.median(times), peak=peak)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import PIL.Image

    start = time.perf_counter()
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8))
    dev = jax.devices()[0]
    backends = [b for b in args.backends.split(",") if b]
    e, d = f"euler-{args.steps}", f"dpm++-{args.dpm_steps}"
    plan = [("svd-jax", backends[0], "euler", args.steps)]
    if not args.no_torch:
        plan.append(("diffusers", "sdpa", "euler", args.steps))
    plan.append(("svd-jax", backends[0], "edm_dpmsolver++", args.dpm_steps))
    if not args.no_torch:
        plan.append(("diffusers", "sdpa", "edm_dpmsolver++", args.dpm_steps))
    plan += [("svd-jax", b, "euler", args.steps) for b in backends[1:]]
    if args.torch_compile and not args.no_torch:
        plan.append(("diffusers+compile", "sdpa", "euler", args.steps))
    rows = []
    for side, backend, sched, steps in plan:
        label = f"{side:<17} {backend:<9} {e if sched == 'euler' else d:<10}"
        if time.perf_counter() - start > args.budget_s:
            rows.append((side, sched, label, None, "skipped: past --budget-s"))
            continue
        try:
            if side == "svd-jax":
                r = run_jax(args, backend, sched, steps, image)
            else:
                r = run_torch(args, sched, steps, image, compile_unet=side.endswith("compile"))
            rows.append((side, sched, label, r, None))
        except Exception as ex:  # noqa: BLE001 - a backend this device lacks is a row that says so
            rows.append((side, sched, label, None, f"failed: {type(ex).__name__}: {str(ex).splitlines()[0][:90]}"))
        print(f"  ... {label} done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    ref = {s: r for side, s, _, r, _ in rows if side == "diffusers" and r}
    where = f"{dev.platform} {getattr(dev, 'device_kind', '')}".strip()
    print(f"SVD-XT{' (tiny configs)' if args.tiny else ''} {args.frames}x{args.height}x{args.width}, CFG, one "
          f"video, random weights; svd-jax {'fp32' if args.tiny else 'bf16'}, diffusers "
          f"{'fp32' if args.tiny else 'fp16 + SDPA'}; {where}; jax {jax.__version__}")
    print(f"{'side':<17} {'attention':<9} {'sampler':<10} | {'cold s':>8} {'warm s':>8} {'peak GiB':>8} | "
          f"{'vs diffusers':>12}")
    for side, sched, label, r, note in rows:
        if r is None:
            print(f"{label} | {note}")
            continue
        peak = f"{r['peak'] / GIB:8.2f}" if r.get("peak") else f"{'-':>8}"
        vs = f"{ref[sched]['warm'] / r['warm']:11.2f}x" if sched in ref and side != "diffusers" else f"{'':>12}"
        print(f"{label} | {r['cold']:8.2f} {r['warm']:8.2f} {peak} | {vs}")
    for side in ("svd-jax", "diffusers"):
        got = {s: r for sd, s, lab, r, _ in rows if sd == side and r and lab.split()[1] in (backends[0], "sdpa")}
        if "euler" in got and "edm_dpmsolver++" in got and args.steps > args.dpm_steps:
            step = (got["euler"]["warm"] - got["edm_dpmsolver++"]["warm"]) / (args.steps - args.dpm_steps)
            fixed = got["euler"]["warm"] - args.steps * step
            print(f"{side}: derived UNet step (CFG) {step * 1e3:.1f} ms, fixed part (CLIP, VAE encode, decode) "
                  f"{fixed:.2f} s")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
