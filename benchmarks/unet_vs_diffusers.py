"""Full-size SVD-XT UNet, random weights, same inputs, fp32 on CPU, one process: jitted Flax vs diffusers eager.

Prints the median forward time of each, their ratio, the Flax compile time and the relative error.

    python benchmarks/unet_vs_diffusers.py [--batch 2 --frames 4 --height 16 --width 32 --repeats 5]
                                           [--torch-compile]

``--torch-compile`` adds diffusers under ``torch.compile`` (inductor, C++ codegen: needs a C++ compiler; its
compile time is printed too).

Needs the [test] extra (torch, diffusers) and ~14 GB of RAM (two fp32 copies of the 1.5 B weights).

By default XLA's CPU YNNPACK fusions are switched off (``--xla_cpu_experimental_ynn_fusion_type=``): XLA's own
CPU convolutions are then 1.2-1.6x faster at these shapes (measured here: 0.97x -> 1.17x of diffusers).
``--ynn`` keeps XLA's default. The flag is jaxlib-specific; a jaxlib that does not know it refuses to start.
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
import torch

from svd_jax.configs import SVD_XT_UNET
from svd_jax.models import UNetSpatioTemporalConditionModel
from svd_jax.weights import load_params


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--height", type=int, default=16, help="latent height")
    ap.add_argument("--width", type=int, default=32, help="latent width")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ynn", action="store_true", help="keep XLA's default CPU YNNPACK fusions")
    ap.add_argument("--torch-compile", action="store_true", help="also time diffusers under torch.compile")
    args = ap.parse_args()
    b, f, h, w = args.batch, args.frames, args.height, args.width

    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    torch.manual_seed(0)
    model = TorchUNet(**SVD_XT_UNET).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    module = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET)
    params = load_params(module.init_params_abstract(), {k: v.numpy() for k, v in model.state_dict().items()})

    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, f, h, w, 8)).astype(np.float32)
    ehs = rng.normal(size=(b, 1, 1024)).astype(np.float32)
    ids = np.tile(np.array([[6, 127, 0.02]], np.float32), (b, 1))
    t = np.float32(0.8)

    xt = torch.from_numpy(x).permute(0, 1, 4, 2, 3).contiguous()
    et, it, tt = torch.from_numpy(ehs), torch.from_numpy(ids), torch.tensor(t)

    def run_torch():
        with torch.no_grad():
            return model(xt, tt, et, it).sample

    ref = run_torch()  # warm-up
    t_torch, _ = _median_time(run_torch, args.repeats)
    t_tc = None
    if args.torch_compile:
        compiled_model = torch.compile(model)

        def run_tc():
            with torch.no_grad():
                return compiled_model(xt, tt, et, it).sample

        t0 = time.perf_counter()
        ref_tc = run_tc()
        t_tc_compile = time.perf_counter() - t0
        t_tc, _ = _median_time(run_tc, args.repeats)
        err_tc = float((ref_tc - ref).abs().max() / ref.abs().max())

    fwd = jax.jit(lambda p, *a: module.apply({"params": p}, *a).sample)
    xs, es, is_, ts = map(jnp.asarray, (x, ehs, ids, t))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, xs, ts, es, is_).compile()
    t_compile = time.perf_counter() - t0
    out = compiled(params, xs, ts, es, is_).block_until_ready()
    t_jax, _ = _median_time(lambda: compiled(params, xs, ts, es, is_).block_until_ready(), args.repeats)

    ref_np = ref.permute(0, 1, 3, 4, 2).numpy()
    err = float(np.abs(np.asarray(out) - ref_np).max() / np.abs(ref_np).max())
    print(f"SVD-XT UNet forward, fp32 CPU ({torch.get_num_threads()} torch threads, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}), B={b} F={f} latent {h}x{w}, median of {args.repeats}")
    print(f"  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"  diffusers eager : {t_torch * 1e3:9.1f} ms")
    if t_tc is not None:
        print(f"  diffusers torch.compile: {t_tc * 1e3:9.1f} ms   (compile {t_tc_compile:.1f} s, "
              f"rel. max diff to eager {err_tc:.1e})")
    print(f"  svd-jax jitted  : {t_jax * 1e3:9.1f} ms   (compile {t_compile:.1f} s)")
    print(f"  speed-up        : {t_torch / t_jax:9.2f}x  (diffusers time / svd-jax time)")
    if t_tc is not None:
        print(f"  vs torch.compile: {t_tc / t_jax:9.2f}x")
    print(f"  rel. max error  : {err:.2e}")


if __name__ == "__main__":
    main()
