"""Load time and peak host memory of the full-size SVD-XT UNet: the diffusers fp16 folder vs the converted one vs
Stability's single-file names.

    python benchmarks/load_time.py [--dir /tmp/svd-load-time] [--dtype bfloat16] [--devices 8] [--keep]

Writes random weights for the full-size UNet (1.52 B params; ``from_config(SVD_XT_UNET)``, svd_jax.configs) in the
fp16 diffusers layout (~3 GB), converts the folder with `python -m convert --dtype DTYPE`, then loads
(a) the diffusers folder and (b) the converted folder with ``from_pretrained(..., dtype=DTYPE)``, each in a fresh
subprocess: onto one device, and onto N forced CPU devices with an FSDP mesh
(``Partitioner(make_mesh(), fsdp=True).param_sharding``). Reported per run: the wall time of ``from_pretrained``
up to ``block_until_ready`` (imports excluded; building the module and ``jax.eval_shape`` of its parameters
included; (c) the same fp16 tensors renamed to a single file's ``model.diffusion_model.*``, loaded with
``from_single_file``), and the process's peak RSS (VmHWM) with and without what it held before loading. The files are
read once before each run, so every run starts from a warm page cache. Everything is deleted at the end unless
--keep. Goals: (b) at least 3x faster than (a); (b)'s peak RSS at most 1.2x the size of the loaded weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _vm_hwm() -> int:
    """Peak resident set size of this process, bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _timed_load(load, dtype: str, mesh: bool) -> dict:
    """``load(dtype, param_sharding) -> (module, params)`` timed up to block_until_ready, with the peak RSS and a
    fingerprint of every 40th tensor (gathered to the host), to check that every layout loads the same numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from svd_jax.sharding import Partitioner, make_mesh

    sharding = Partitioner(make_mesh(), fsdp=True).param_sharding if mesh else None
    before = _vm_hwm()
    t0 = time.perf_counter()
    _, params = load(getattr(jnp, dtype), sharding)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    peak = _vm_hwm()
    leaves = jax.tree_util.tree_leaves(params)
    check = float(sum(np.asarray(x, np.float64).sum() for x in leaves[::40]))
    n_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    return dict(load_s=load_s, peak_rss=peak, rss_before=before, devices=len(jax.devices()), checksum=check,
                weights_bytes=n_bytes)


def _child_load(folder: str, dtype: str, variant: str | None, mesh: bool) -> dict:
    from svd_jax.models import UNetSpatioTemporalConditionModel

    return _timed_load(lambda dt, sh: UNetSpatioTemporalConditionModel.from_pretrained(
        folder, dtype=dt, variant=variant, param_sharding=sh), dtype, mesh)


def _child_load_single(file: str, dtype: str, mesh: bool) -> dict:
    from svd_jax.models import UNetSpatioTemporalConditionModel

    return _timed_load(lambda dt, sh: UNetSpatioTemporalConditionModel.from_single_file(
        file, dtype=dt, param_sharding=sh), dtype, mesh)


def _child_make_sgm(folder: str, file: str) -> dict:
    """The diffusers fp16 UNet's tensors renamed to Stability's single-file names (svd_jax/weights/sgm.py),
    streamed into one file."""
    from svd_jax.configs import SVD_XT_UNET
    from svd_jax.models import UNetSpatioTemporalConditionModel
    from svd_jax.weights.safetensors_io import read_safetensors, write_safetensors
    from svd_jax.weights.sgm import unet_sgm_name

    t0 = time.perf_counter()
    unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET)
    tensors = read_safetensors(Path(folder) / "diffusion_pytorch_model.fp16.safetensors")
    names = sorted(tensors)
    specs = [(unet_sgm_name(n, unet), tensors[n].dtype, tensors[n].shape) for n in names]
    size = write_safetensors(file, specs, (tensors[n] for n in names), metadata={"format": "pt"})
    return dict(load_s=time.perf_counter() - t0, bytes=size, peak_rss=_vm_hwm())


def _child_convert(src: str, dst: str, dtype: str) -> dict:
    from svd_jax.convert import convert_checkpoint

    before = _vm_hwm()
    t0 = time.perf_counter()
    convert_checkpoint(src, dst, variant="fp16", dtype=dtype, log=lambda m: None)
    return dict(load_s=time.perf_counter() - t0, peak_rss=_vm_hwm(), rss_before=before)


def _child_make(folder: str) -> dict:
    import numpy as np

    from svd_jax.configs import SVD_XT_UNET
    from svd_jax.models import UNetSpatioTemporalConditionModel
    from svd_jax.tiny import write_random_weights

    t0 = time.perf_counter()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNetSpatioTemporalConditionModel", **SVD_XT_UNET}
    (out / "config.json").write_text(json.dumps(config) + "\n")
    size = write_random_weights(out / "diffusion_pytorch_model.fp16.safetensors",
                                UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET), np.float16, seed=0)
    return dict(load_s=time.perf_counter() - t0, bytes=size, peak_rss=_vm_hwm())


def _run_child(args: list[str], devices: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _warm(folder: Path) -> None:
    # Read every file once so that each run starts from the page cache, not the disk.
    for f in folder.rglob("*.safetensors"):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 26):
                pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/svd-load-time")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--devices", type=int, default=8, help="forced CPU devices for the mesh runs")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        out = {"make": lambda: _child_make(*rest),
               "convert": lambda: _child_convert(*rest),
               "make_sgm": lambda: _child_make_sgm(*rest),
               "load_single": lambda: _child_load_single(rest[0], rest[1], rest[2] == "mesh"),
               "load": lambda: _child_load(rest[0], rest[1], rest[2] if rest[2] != "none" else None,
                                           rest[3] == "mesh")}[kind]()
        print(json.dumps(out))
        return 0

    work = Path(args.dir)
    if work.exists():
        shutil.rmtree(work)
    diff, flax = work / "diffusers_unet", work / "flax_unet"
    try:
        made = _run_child(["make", str(diff)])
        print(f"wrote the random full-size UNet, fp16 diffusers layout: {made['bytes'] / 1e9:.2f} GB in "
              f"{made['load_s']:.1f} s")
        _warm(diff)
        conv = _run_child(["convert", str(diff), str(flax), args.dtype])
        print(f"python -m convert --variant fp16 --dtype {args.dtype}: {conv['load_s']:.1f} s, peak RSS "
              f"{conv['peak_rss'] / 1e9:.2f} GB ({(conv['peak_rss'] - conv['rss_before']) / 1e9:.2f} GB above its "
              f"{conv['rss_before'] / 1e9:.2f} GB before converting)")
        single = work / "svd_xt_unet_only.safetensors"
        made_sgm = _run_child(["make_sgm", str(diff), str(single)])
        print(f"the same tensors in Stability's single-file names (model.diffusion_model.*): "
              f"{made_sgm['bytes'] / 1e9:.2f} GB in {made_sgm['load_s']:.1f} s")
        rows = {}
        a, b, c = "(a) diffusers fp16", "(b) converted " + args.dtype, "(c) single file fp16"
        for name, folder, variant in ((a, diff, "fp16"), (b, flax, "none")):
            for devices in (1, args.devices):
                _warm(folder)
                rows[name, devices] = _run_child(["load", str(folder), args.dtype, variant,
                                                  "mesh" if devices > 1 else "single"], devices)
        for devices in (1, args.devices):
            _warm(work)
            rows[c, devices] = _run_child(["load_single", str(single), args.dtype,
                                           "mesh" if devices > 1 else "single"], devices)
        size = next(iter(rows.values()))["weights_bytes"]  # the loaded parameters, all devices counted once
        print(f"\nUNet {args.dtype} weights: {size / 1e9:.2f} GB (of {made['bytes'] / 1e9:.2f} GB fp16 on disk); "
              f"load = from_pretrained + block_until_ready, warm page cache; one run each")
        print(f"{'':24s} {'devices':>7s} {'load s':>7s} {'peak RSS GB':>11s} {'x weights':>9s} {'above start GB':>14s}")
        for (name, devices), r in rows.items():
            print(f"{name:24s} {devices:7d} {r['load_s']:7.2f} {r['peak_rss'] / 1e9:11.2f} "
                  f"{r['peak_rss'] / size:9.2f} {(r['peak_rss'] - r['rss_before']) / 1e9:14.2f}")
        print()
        for devices in (1, args.devices):
            ra, rb = rows[a, devices], rows[b, devices]
            where = "one device" if devices == 1 else f"{devices} devices, FSDP mesh"
            rc = rows[c, devices]
            print(f"{where:26s}: (b) loads {ra['load_s'] / rb['load_s']:.2f}x faster than (a) (goal >= 3x); "
                  f"peak RSS (b) {rb['peak_rss'] / size:.2f}x the weights (goal <= 1.2x), (a) "
                  f"{ra['peak_rss'] / size:.2f}x; same numbers: {ra['checksum'] == rb['checksum']}; "
                  f"(c) the single file {rc['load_s'] / ra['load_s']:.2f}x (a)'s time, "
                  f"same numbers as (a): {rc['checksum'] == ra['checksum']}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
