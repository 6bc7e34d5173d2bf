"""Per-device compute, memory and collective traffic of sharded SVD-XT, from compiled programs on abstract
shapes (no weights needed): one CFG denoising step of the UNet and one 8-frame VAE decode chunk per video,
on meshes of 1, 2, 4 and 8 devices, for a batch of 8 videos (mesh = data axis) and for one video (mesh =
space axis, the frame height split).

    python benchmarks/sharding_report.py [--frames 25 --height 576 --width 1024 --dtype bfloat16]

Runs on CPU with 8 forced host devices; XLA's SPMD partitioner produces the same per-device program shapes
on TPU/GPU (its cost model and memory numbers are the compiler's, not a measurement of an accelerator).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from svd_jax.configs import SVD_VAE, SVD_XT_UNET
from svd_jax.models import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from svd_jax.options import ModelOptions
from svd_jax.sharding import Partitioner, make_mesh

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo: str) -> dict[str, float]:
    """Bytes produced by each kind of collective in an HLO module's text (per device, loop bodies once)."""
    out = dict.fromkeys(COLLECTIVES, 0.0)
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.+?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(",
                      line)
        if not m:
            continue
        for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            if dt in _BYTES:
                out[m.group(2)] += _BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return out


def analyse(part, fn, args, in_shardings, out_sharding):
    compiled = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_sharding).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return float(cost.get("flops", 0.0)), peak, collective_bytes(compiled.as_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=8, help="VAE decode chunk (frames per video)")
    ap.add_argument("--meshes", default="1,2,4,8")
    ap.add_argument("--split", default="height+frames,height,frames",
                    help="intra-video splits to compare for one video")
    ap.add_argument("--cases", default="8,1", help="batch sizes (videos)")
    ap.add_argument("--cfg-data", default="height+frames",
                    help="splits for which one video also runs with the CFG halves on a data axis of 2 (mesh 2 x n/2)")
    args = ap.parse_args()
    dt = getattr(jnp, args.dtype)
    f, h, w = args.frames, args.height // 8, args.width // 8
    devices = jax.devices()
    print(f"SVD-XT, {f} frames {args.width}x{args.height}, CFG, {args.dtype}; per device; "
          f"{len(devices)} {devices[0].platform} devices; collectives = bytes produced per device per call")
    print(f"{'case':>14} {'mesh':>9} | {'UNet step TFLOP':>15} {'x less':>6} {'peak GiB':>8} {'coll MB':>8} "
          f"{'coll/FLOP':>9} | {'decode TFLOP':>12} {'peak GiB':>8} {'coll MB':>8}")
    runs = []
    for videos in (int(v) for v in args.cases.split(",")):
        for split in (["height"] if videos > 1 else args.split.split(",")):
            runs.append((videos, split))
    runs += [(1, s + "+cfg") for s in args.cfg_data.split(",") if s]
    base_flops = {}  # videos -> one-device FLOPs, for the "x less" column
    for videos, split in runs:
        cfg_data = split.endswith("+cfg")
        split = split.removesuffix("+cfg")
        case = f"{videos} video{'s' if videos > 1 else ''}" + ("" if videos > 1 else f" {split}") + \
            (" cfg/data" if cfg_data else "")
        for n in (int(x) for x in args.meshes.split(",")):
            if cfg_data and n < 2:
                continue
            mesh = make_mesh(data=n, space=1, devices=devices[:n]) if videos % n == 0 and videos > 1 else \
                make_mesh(data=2, space=n // 2, devices=devices[:n]) if cfg_data else \
                make_mesh(data=1, space=n, devices=devices[:n])
            part = Partitioner(mesh, split=split)
            opts = part.model_options(ModelOptions())  # block-boundary constraints, kernels pinned at use
            unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, dtype=dt, options=opts)
            vae = AutoencoderKLTemporalDecoder.from_config(SVD_VAE, dtype=dt, options=opts)
            up, vp = unet.init_params_abstract(), vae.init_params_abstract()
            rep = part.sharding(P())
            vid = part.input_sharding(part.video_spec(), (b2 := 2 * videos, f, h, w, 8))
            step_args = (up, jax.ShapeDtypeStruct((b2, f, h, w, 8), dt), jax.ShapeDtypeStruct((), jnp.float32),
                         jax.ShapeDtypeStruct((b2, 1, 1024), dt), jax.ShapeDtypeStruct((b2, 3), dt))
            step = lambda p, x, t, e, i: unet.apply({"params": p}, part.constrain(x.reshape((-1,) + x.shape[2:]))
                                                    .reshape(x.shape), t, e, i).sample
            uf, um, uc = analyse(part, step, step_args,
                                 (jax.tree_util.tree_map(lambda _: rep, up), vid, rep, rep, rep), vid)
            c = min(args.chunk, f)
            dec_args = (vp, jax.ShapeDtypeStruct((videos * c, h, w, 4), dt))
            fr = part.input_sharding(part.frames_spec(), (videos * c, h, w, 4))
            dec = lambda p, z: vae.apply({"params": p}, part.constrain(z), num_frames=c, method="decode")
            df, dm, dc = analyse(part, dec, dec_args, (jax.tree_util.tree_map(lambda _: rep, vp), fr), fr)
            base = base_flops.setdefault(videos, uf)
            coll = sum(uc.values())
            print(f"{case:>14} {str(dict(mesh.shape)):>9} | {uf / 1e12:15.2f} {base / uf:6.2f} {um / 2**30:8.2f} "
                  f"{coll / 1e6:8.1f} {coll / max(uf, 1):9.2e} | {df / 1e12:12.2f} {dm / 2**30:8.2f} "
                  f"{sum(dc.values()) / 1e6:8.1f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
