"""One fine-tuning step of the full-size SVD-XT UNet on CPU, fp32: svd-jax's jitted step vs the same step in
PyTorch (diffusers' UNetSpatioTemporalConditionModel, torch.optim.AdamW), median step time and their ratio.

    python benchmarks/train_speed.py [--frames 4 --height 16 --width 32 --steps 5 --warmup 1]
                                     [--trainable temporal --ynn both --matmul 4096 --sides jax,torch]

What is timed, on both sides, with the same shapes (B=1, F=4, latent 16x32 = 128x256 pixels; random weights, not
the same on both sides, which does not matter for timing) and one fixed conditioning (latents, image latents,
CLIP embedding, time ids, sigma, noise: the same numbers on both sides):

* svd-jax: ``jax.jit(lambda s, c: step.update(s, jax.grad(step.loss)(s.params, s.frozen, c)),
  donate_argnums=0)`` of a ``TrainStep`` (svd_jax/training/step.py; ``TrainConfig(dtype="float32")``, AdamW,
  global-norm clipping at 1.0, remat none): the UNet forward, the EDM v-loss (svd_jax/training/loss.py), the
  backward, clipping and the AdamW update, one compiled program. This form, rather than the whole
  ``step(state, batch, encoder_params)``, is what the torch side computes too: the whole step also draws sigma,
  the noise and the dropout and runs the VAE encoder on the first frame.
* PyTorch: the same EDM loss on diffusers' UNet, ``loss.backward()``, ``clip_grad_norm_(1.0)``,
  ``torch.optim.AdamW.step()`` (torch's default implementation for CPU tensors), ``zero_grad()``;
  ``torch.set_num_threads(os.cpu_count())``.

What trains (``--trainable``): full fine-tuning of the 1.52 B-parameter UNet needs 24.4 GB for float32 weights,
gradients and the two AdamW moments alone, more than a 24 GiB machine holds for either side; the default
``temporal`` trains the temporal layers (0.66 B parameters, TEMPORAL_MARKERS of svd_jax/training/config.py; the
same tensors on both sides, checked) with the spatial layers frozen (no gradient, no optimizer state), which still
back-propagates through the whole UNet. ``--trainable full`` for a machine with >= 32 GB.

The median of ``--steps`` timed steps is the headline (the min is printed too: on a shared machine other
processes' load only ever adds time; each side's load average is printed). Each side runs in its own subprocess,
one after the other: the two copies of the weights, gradients and AdamW state would not fit together. The JAX
side also reports the compiled step's FLOPs (``cost_analysis()``) and the achieved FLOP/s against a matmul peak
measured in the same process (a ``--matmul`` N x N x N float32 ``jnp.dot``, median of 5; torch.mm of the same
size on the torch side).

``--ynn both`` (the default) runs the JAX side twice: with XLA's CPU YNNPACK fusions off
(``--xla_cpu_experimental_ynn_fusion_type=``, as benchmarks/unet_vs_diffusers.py) and with XLA's default; the
ratio uses the faster. ``--ynn off`` / ``--ynn on`` runs one of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
GOAL = 1.2  # torch time / svd-jax time


def conditioning(args) -> dict:
    """The fixed conditioning of every timed step (numpy, channels-last as svd_jax.training.denoising_loss takes)."""
    import numpy as np

    rng = np.random.default_rng(0)
    b, f, h, w = 1, args.frames, args.height, args.width
    return dict(x0=rng.normal(size=(b, f, h, w, 4)).astype(np.float32),
                image_latents=rng.normal(size=(b, h, w, 4)).astype(np.float32),
                image_embeds=rng.normal(size=(b, 1, 1024)).astype(np.float32),
                added_time_ids=np.array([[6, 127, 0.02]], np.float32),
                sigma=np.array([1.3], np.float32),
                noise=rng.normal(size=(b, f, h, w, 4)).astype(np.float32))


def timed(fn, warmup: int, steps: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def jax_side(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from svd_jax.configs import SVD_XT_UNET
    from svd_jax.models import UNetSpatioTemporalConditionModel
    from svd_jax.training import TrainConfig, TrainState, TrainStep
    from svd_jax.training.step import flatten_params, trainable_keys

    n = args.matmul
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    t_mm, _ = timed(lambda: dot(a, a).block_until_ready(), 2, 5)
    peak = 2 * n**3 / t_mm

    unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, dtype=jnp.float32)
    cfg = TrainConfig(num_frames=args.frames, height=args.height * 8, width=args.width * 8, batch_size=1,
                      dtype="float32", trainable=args.trainable, remat="none", max_grad_norm=1.0)
    step = TrainStep(unet, None, None, cfg)
    abstract = flatten_params(unet.init_params_abstract())
    keys = set(trainable_keys(abstract, args.trainable))

    # random weights, one leaf at a time from numpy (one jit building all 1428 leaves takes minutes to compile and
    # holds their random bits at once); the AdamW state from the optimizer's own init
    rng = np.random.default_rng(0)
    flat = {}
    for k, s in sorted(abstract.items()):
        if k.endswith("scale"):
            flat[k] = jnp.ones(s.shape, jnp.float32)
        elif k.endswith("bias"):
            flat[k] = jnp.zeros(s.shape, jnp.float32)
        elif k.endswith("mix_factor"):  # diffusers' initial value
            flat[k] = jnp.full(s.shape, 0.5, jnp.float32)
        else:  # kernels (conv (kh, kw, in, out), dense (in, out)): variance 1 / fan-in
            x = rng.standard_normal(s.shape, dtype=np.float32)
            x *= np.float32(1 / np.sqrt(np.prod(s.shape[:-1])))
            flat[k] = jax.device_put(x)
            del x
    params = {k: v for k, v in flat.items() if k in keys}
    frozen = {k: v for k, v in flat.items() if k not in keys}
    del flat
    state = TrainState(jnp.zeros((), jnp.int32), params, frozen, jax.jit(step.tx.init)(params), None,
                       jax.random.PRNGKey(0))
    del params, frozen
    cond = {k: jnp.asarray(v) for k, v in conditioning(args).items()}
    fn = jax.jit(lambda s, c: step.update(s, jax.grad(step.loss)(s.params, s.frozen, c)), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, cond).compile()
    t_compile = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    mem = compiled.memory_analysis()
    loss_fn = jax.jit(step.loss)
    loss = float(loss_fn(state.params, state.frozen, cond))
    box = [state]

    def run():
        box[0] = compiled(box[0], cond)
        jax.block_until_ready(box[0])

    load0 = load()
    t_step, times = timed(run, args.warmup, args.steps)
    n_trained = sum(int(np.prod(v.shape)) for v in box[0].params.values())
    return dict(side="jax", ynn=args.ynn_on, jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                step_s=t_step, times=times, compile_s=t_compile, flops=flops, matmul_flops_per_s=peak,
                matmul_s=t_mm, loss=loss, n_trained=n_trained, n_trained_tensors=len(box[0].params),
                finite=bool(np.isfinite(float(loss_fn(box[0].params, box[0].frozen, cond)))),
                temp_gib=mem.temp_size_in_bytes / 2**30, argument_gib=mem.argument_size_in_bytes / 2**30,
                rss_gib=rss_gib(), load=f"{load0} -> {load()}")


def torch_edm_loss(model, x0, image_latents, image_embeds, added_time_ids, sigma, noise):
    """svd_jax.training.denoising_loss in torch on diffusers' UNet (channels-first tensors)."""
    import torch

    s = sigma[:, None, None, None, None]
    x = x0 + s * noise
    c_in, c_skip, c_out = 1 / torch.sqrt(s**2 + 1), 1 / (s**2 + 1), -s / torch.sqrt(s**2 + 1)
    z = image_latents[:, None].expand(-1, x.shape[1], -1, -1, -1)
    v = model(torch.cat([c_in * x, z], dim=2), 0.25 * torch.log(sigma), image_embeds, added_time_ids).sample
    return torch.mean((s**2 + 1) / s**2 * (c_skip * x + c_out * v - x0) ** 2)


def torch_side(args) -> dict:
    import torch
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    from svd_jax.configs import SVD_XT_UNET
    from svd_jax.training.config import TEMPORAL_MARKERS

    torch.set_num_threads(os.cpu_count())
    n = args.matmul
    a = torch.randn(n, n)
    t_mm, _ = timed(lambda: torch.mm(a, a), 2, 5)

    torch.manual_seed(0)
    model = TorchUNet(**SVD_XT_UNET).train()
    trained = []
    for name, p in model.named_parameters():
        on = args.trainable == "full" or any(m in name for m in TEMPORAL_MARKERS)
        p.requires_grad_(on)
        if on:
            trained.append(p)
    opt = torch.optim.AdamW(trained, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    cf = lambda a: a.permute(0, 1, 4, 2, 3).contiguous() if a.ndim == 5 else a.permute(0, 3, 1, 2).contiguous()
    cond = {k: torch.from_numpy(v) for k, v in conditioning(args).items()}
    for k in ("x0", "noise", "image_latents"):
        cond[k] = cf(cond[k])
    parts = {"fwd_bwd": [], "opt": []}
    losses = []

    def run():
        t0 = time.perf_counter()
        loss = torch_edm_loss(model, **cond)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad()
        parts["fwd_bwd"].append(t1 - t0)
        parts["opt"].append(time.perf_counter() - t1)
        losses.append(float(loss))

    load0 = load()
    t_step, times = timed(run, args.warmup, args.steps)
    return dict(side="torch", torch=torch.__version__, threads=torch.get_num_threads(), step_s=t_step, times=times,
                fwd_bwd_s=statistics.median(parts["fwd_bwd"][args.warmup:]),
                opt_s=statistics.median(parts["opt"][args.warmup:]), matmul_flops_per_s=2 * n**3 / t_mm,
                loss=losses[0], n_trained=sum(p.numel() for p in trained), n_trained_tensors=len(trained),
                rss_gib=rss_gib(), load=f"{load0} -> {load()}")


def run_side(side: str, args, ynn: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if not ynn:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {NO_YNN}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, *sys.argv[1:]]
    if ynn:
        cmd.append("--ynn-on")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        how = f"killed by signal {-p.returncode} (out of memory?)" if p.returncode < 0 else f"rc {p.returncode}"
        tail = "\n".join(p.stderr.strip().splitlines()[-5:])
        return dict(side=side, ynn=ynn, error=f"{how}: {tail}")
    return dict(json.loads(lines[-1][len("RESULT "):]), wall_s=time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--height", type=int, default=16, help="latent height (pixels / 8)")
    ap.add_argument("--width", type=int, default=32, help="latent width (pixels / 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (their median and min are reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (after the JAX compile)")
    ap.add_argument("--trainable", choices=("temporal", "full"), default="temporal")
    ap.add_argument("--ynn", choices=("both", "off", "on"), default="both",
                    help="JAX side with XLA's CPU YNNPACK fusions off, on (XLA's default), or both")
    ap.add_argument("--matmul", type=int, default=4096, help="N of the N x N x N float32 matmul peak")
    ap.add_argument("--sides", default="jax,torch", help="which sides to run (jax, torch or both)")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--ynn-on", dest="ynn_on", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = jax_side(args) if args.worker == "jax" else torch_side(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    print(f"SVD-XT UNet fine-tuning step, fp32 CPU, B=1 F={args.frames} latent {args.height}x{args.width} "
          f"({args.height * 8}x{args.width * 8} pixels), trainable={args.trainable}, AdamW + clipping, "
          f"{args.steps} timed steps after {args.warmup} warm-up; {os.cpu_count()} CPU cores, {datetime.date.today()}")
    print(f"  command: python {' '.join(sys.argv)}")
    sides = args.sides.split(",")
    ynns = {"both": (False, True), "off": (False,), "on": (True,)}[args.ynn]
    jax_runs = [run_side("jax", args, ynn) for ynn in ynns] if "jax" in sides else []
    tr = run_side("torch", args, False) if "torch" in sides else None
    gf = lambda x: x / 1e9
    ms = lambda r: f"median {r['step_s'] * 1e3:.0f} ms, min {min(r['times']) * 1e3:.0f} ms"
    for r in jax_runs:
        label = "svd-jax, YNNPACK fusions " + ("on (XLA default)" if r["ynn"] else "off")
        if "error" in r:
            print(f"  {label}: failed: {r['error']}")
            continue
        print(f"  {label}: {ms(r)} per step (steps {', '.join(f'{t:.1f}' for t in r['times'])} s; compile "
              f"{r['compile_s']:.0f} s; jax {r['jax']}; load avg {r['load']})")
        print(f"      FLOPs/step {gf(r['flops']):.0f} G (cost_analysis); achieved {gf(r['flops'] / r['step_s']):.1f} "
              f"GFLOP/s at the median ({gf(r['flops'] / min(r['times'])):.1f} at the min) vs "
              f"{gf(r['matmul_flops_per_s']):.1f} GFLOP/s of a {args.matmul}^3 fp32 jnp.dot: "
              f"{r['flops'] / r['step_s'] / r['matmul_flops_per_s']:.0%} "
              f"({r['flops'] / min(r['times']) / r['matmul_flops_per_s']:.0%})")
        print(f"      step program: arguments {r['argument_gib']:.1f} GiB, temporaries {r['temp_gib']:.1f} GiB; "
              f"process peak RSS {r['rss_gib']:.1f} GiB; loss {r['loss']:.4g}, finite after the steps: {r['finite']}; "
              f"trained {r['n_trained'] / 1e9:.3f} B params in {r['n_trained_tensors']} tensors")
    if tr is not None:
        if "error" in tr:
            print(f"  PyTorch: failed: {tr['error']}")
        else:
            print(f"  PyTorch (diffusers eager, torch {tr['torch']}, {tr['threads']} threads): {ms(tr)} per step "
                  f"(steps {', '.join(f'{t:.1f}' for t in tr['times'])} s; load avg {tr['load']})")
            print(f"      median forward+loss+backward {tr['fwd_bwd_s'] * 1e3:.0f} ms, clip+AdamW.step+zero_grad "
                  f"{tr['opt_s'] * 1e3:.0f} ms; torch.mm {args.matmul}^3 fp32 {gf(tr['matmul_flops_per_s']):.1f} "
                  f"GFLOP/s; peak RSS {tr['rss_gib']:.1f} GiB; loss {tr['loss']:.4g}; trained "
                  f"{tr['n_trained'] / 1e9:.3f} B params in {tr['n_trained_tensors']} tensors")
    ok = [r for r in jax_runs if "error" not in r]
    if ok and tr is not None and "error" not in tr:
        for r in ok:
            if r["n_trained"] != tr["n_trained"]:
                print(f"  WARNING: the sides train different parameter counts ({r['n_trained']} vs {tr['n_trained']})")
        best = min(ok, key=lambda r: r["step_s"])
        ratio = tr["step_s"] / best["step_s"]
        print(f"  speed-up (torch median / svd-jax median, YNNPACK fusions {'on' if best['ynn'] else 'off'}): "
              f"{ratio:.2f}x (of the min times: {min(tr['times']) / min(best['times']):.2f}x); goal >= {GOAL}x: "
              f"{'PASS' if ratio >= GOAL else 'FAIL'}")
        for r in ok:
            if r is not best:
                print(f"      (YNNPACK fusions {'on' if r['ynn'] else 'off'}: {tr['step_s'] / r['step_s']:.2f}x, "
                      f"of the min times {min(tr['times']) / min(r['times']):.2f}x)")


if __name__ == "__main__":
    main()
