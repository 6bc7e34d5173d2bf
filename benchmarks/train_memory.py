"""Peak memory of the compiled SVD-XT fine-tuning step (svd_jax/training/step.py) on abstract shapes: no weights,
nothing allocated, only XLA's memory_analysis() of the compiled program.

    python benchmarks/train_memory.py [--sizes 14x320x576,14x576x1024,25x576x1024 --remat none,blocks,...
                                       --trainable full,temporal --devices 1,8 --pixel-case 25x576x1024,blocks,full,1
                                       --cpu-remat keep --jobs 2 --jsonl results.jsonl]
    python benchmarks/train_memory.py --residuals-only [...]            # no compile: autodiff residuals only
    python benchmarks/train_memory.py --table-from results.jsonl       # the table of earlier runs, no compile

What is compiled: ``TrainStep(unet, vae, None, TrainConfig(dtype="bfloat16", ...))`` for the full-size SVD-XT UNet
(svd_jax/configs.py), AdamW (optax, float32 moments), global-norm clipping, no EMA, one clip per device:

* ``--devices 1``: batch 1 on one device;
* ``--devices 8``: batch 8 on an 8-device mesh (``make_mesh(data=8)``, ``Partitioner(mesh, fsdp=True)``: one clip
  per device, weights, gradients and optimizer state FSDP-split); the numbers are per device. Eight CPU devices
  need ``--xla_force_host_platform_device_count=8``, which this script sets for its workers.

Batches are the pre-encoded form (``latents``, ``first_frame``, ``image_embeds``: the step runs the VAE encoder on
the noise-augmented first frame only, and no CLIP; CLIP's weights are not an argument). ``--pixel-case`` also
compiles one cell with the pixel form (``pixels``: the VAE encodes every frame and CLIP the first one inside the
step; the frozen VAE and CLIP weights, bfloat16, are then arguments).

Peak = arguments + outputs + temporaries - aliased (the donated state's outputs reuse its buffers), as
benchmarks/memory.py defines it. The state's bytes (trained float32 weights, frozen float32 weights, AdamW
moments) are also computed from ``step.abstract_state`` for full, temporal and LoRA (rank 16, 64) training; a
frozen weight has no gradient and no optimizer state. ``--trainable lora16,lora64`` compiles LoRA cells (the
adapter on every attention's to_q, to_k, to_v, to_out.0; goal at 25x576x1024 on one device: <= 24 GiB).

Residuals (also ``--residuals-only``, which compiles nothing and takes seconds a cell): the arrays JAX's autodiff
saves from the UNet's forward pass for its backward (the jaxpr of the loss's vjp; weights they merely reference
are not counted), per clip. They are what a remat policy changes, before any backend.

XLA:CPU and remat: by default XLA:CPU undoes ``jax.checkpoint``: its ``cse_barrier_expander`` pass removes the
optimisation barriers that keep a recomputation apart (before layout assignment), and the CSE/DCE that follows
merges the recomputed forward into the original one (a 16-layer toy: the same temporaries and the same dot count
with and without checkpointing), so every remat policy compiles to about the same program. ``--cpu-remat keep``
(the default) compiles with ``--xla_disable_hlo_passes=cse_barrier_expander``, which keeps the recomputation as
jax.checkpoint asks (the toy: 3.2 -> 1.4 GiB of temporaries, gradients bit-identical); ``--cpu-remat xla-default``
measures XLA:CPU as it is.

Caveat: these are XLA:CPU's numbers (this machine). A TPU or GPU compile schedules, fuses and rematerialises
differently (and a TPU's own rematerialisation pass fits the program to its HBM); treat them as what the program
needs as XLA:CPU lays it out, not as a TPU/GPU measurement.

Each cell compiles in its own subprocess (a full-size compile takes minutes and several GB of host RAM; one
failure or out-of-memory kill does not end the run). As benchmarks/memory.py, the workers compile with XLA:CPU's
memory-minimising scheduler (``--cpu-scheduler memory``, the default) and, as benchmarks/unet_vs_diffusers.py, with
XLA's CPU YNNPACK fusions off (``--ynn`` keeps them); both are XLA_FLAGS entries, read when jax starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import resource
import subprocess
import sys
import time

from svd_jax.options import REMAT_POLICIES  # imports no jax (XLA_FLAGS are set before jax starts)

GIB = 2**30
CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
DEVICE_COUNT = "--xla_force_host_platform_device_count=8"
KEEP_REMAT = "--xla_disable_hlo_passes=cse_barrier_expander"
REMAT_ORDER = REMAT_POLICIES  # svd_jax/options.py
GOALS = {1: 48.0, 8: 16.0}  # GiB per device, full fine-tuning at 25x576x1024
LORA_GOAL = 24.0  # GiB, LoRA (rank 16 and 64) at 25x576x1024 on one device
GOAL_SIZE = "25x576x1024"


def parse_trainable(t: str) -> dict:
    """``full`` / ``temporal`` / ``lora<rank>`` (e.g. ``lora16``: a rank-16 adapter on the default targets) ->
    TrainConfig fields."""
    if t.startswith("lora"):
        return dict(trainable="lora", lora_rank=int(t[4:] or 16))
    return dict(trainable=t)


def parse_size(s: str) -> tuple[int, int, int]:
    f, h, w = (int(v) for v in s.lower().split("x"))
    return f, h, w


def peak_bytes(m) -> int:
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def nbytes(tree, per_device=None) -> int:
    """Bytes of a pytree of ShapeDtypeStructs; with ``per_device(shape) -> divisor``, one device's share."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        n = int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        total += n // (per_device(x.shape) if per_device else 1)
    return total


def build(trainable: str, remat: str, size: str, devices: int, form: str = "latents"):
    """-> (step, abstract state, abstract batch, abstract encoder params) of one cell."""
    import jax
    import jax.numpy as jnp

    from svd_jax.configs import SVD_CLIP, SVD_VAE, SVD_XT_UNET
    from svd_jax.models import (
        AutoencoderKLTemporalDecoder,
        CLIPVisionModelWithProjection,
        UNetSpatioTemporalConditionModel,
    )
    from svd_jax.sharding import Partitioner, make_mesh
    from svd_jax.training import TrainConfig, TrainStep

    f, h, w = parse_size(size)
    b = devices  # one clip per device
    part = Partitioner(make_mesh(data=devices), fsdp=True) if devices > 1 else None
    unet = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET, dtype=jnp.float32)
    vae = AutoencoderKLTemporalDecoder.from_config(SVD_VAE, dtype=jnp.bfloat16)
    clip = CLIPVisionModelWithProjection.from_config(SVD_CLIP, dtype=jnp.bfloat16) if form == "pixels" else None
    cfg = TrainConfig(num_frames=f, height=h, width=w, batch_size=b, dtype="bfloat16", remat=remat,
                      optimizer="adamw", **parse_trainable(trainable))
    step = TrainStep(unet, vae, clip, cfg, partitioner=part)
    state = step.abstract_state(unet.init_params_abstract())
    sds = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
    lat = (b, f, h // 8, w // 8, 4)
    if form == "pixels":
        batch = dict(pixels=sds((b, f, h, w, 3)))
    else:
        batch = dict(latents=sds(lat), first_frame=sds((b, h, w, 3)),
                     image_embeds=sds((b, 1, SVD_CLIP["projection_dim"])))
    batch.update(fps=sds((b,)), motion_bucket_id=sds((b,)))
    enc = {"vae": vae.init_params_abstract()}
    if clip is not None:
        enc["image_encoder"] = clip.init_params_abstract()
    enc = jax.tree.map(lambda x: sds(x.shape, jnp.bfloat16), enc)  # frozen encoders as the pipeline loads them
    return step, state, batch, enc


def state_report(devices: int) -> list[dict]:
    """The train state's bytes (full and temporal), on one device and per device under FSDP over ``devices``."""
    from svd_jax.sharding import Partitioner, make_mesh

    rows = []
    part = Partitioner(make_mesh(data=devices), fsdp=True) if devices > 1 else None
    for trainable in ("full", "temporal", "lora16", "lora64"):
        step, state, _, _ = build(trainable, "none", GOAL_SIZE, 1)
        split = None
        if part is not None:
            split = lambda shape: devices if any(a is not None for a in part.param_spec(shape)) else 1
        row = dict(trainable=trainable, devices=devices, n_trained=len(state.params), n_frozen=len(state.frozen),
                   trained=nbytes(state.params, split), frozen=nbytes(state.frozen, split),
                   opt_state=nbytes(state.opt_state, split))
        row["total"] = row["trained"] + row["frozen"] + row["opt_state"]
        row["grads"] = row["trained"]  # float32 gradients of the trained weights, live in the step (temporaries)
        rows.append(row)
    return rows


def saved_residuals(step, state, batch, enc) -> tuple[int, int]:
    """Bytes that JAX's autodiff saves from the UNet's forward for its backward (the loss's vjp residuals, before
    any XLA optimisation): (new arrays, references to the arguments). Backend-independent: what remat changes."""
    import jax
    import numpy as np

    key = jax.random.PRNGKey(0)
    cond = jax.eval_shape(lambda k, b, e: step.conditioning(k, b, e)[0], key, batch, enc)
    vjp = lambda p, fr, c: jax.vjp(lambda p: step.loss(p, fr, c), p)[1]
    jaxpr = jax.make_jaxpr(vjp)(state.params, state.frozen, cond).jaxpr
    ins = {id(v) for v in jaxpr.invars}
    seen, new, args = set(), 0, 0
    for v in jaxpr.outvars:
        if type(v).__name__ == "Literal" or id(v) in seen:
            continue
        seen.add(id(v))
        n = int(np.prod(v.aval.shape, dtype=np.int64)) * np.dtype(v.aval.dtype).itemsize
        if id(v) in ins:
            args += n
        else:
            new += n
    return new, args


def worker(cell: dict) -> dict:
    """Compile one cell and return its memory analysis (runs in a subprocess)."""
    import jax

    t0 = time.perf_counter()
    step, state, batch, enc = build(cell["trainable"], cell["remat"], cell["size"], cell["devices"], cell["form"])
    res = {}
    if cell["devices"] == 1:  # per clip; the same per device on the mesh (one clip each)
        res["residuals"], res["residual_args"] = saved_residuals(step, state, batch, enc)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, enc)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    return dict(cell, peak=peak_bytes(m), temp=m.temp_size_in_bytes, arguments=m.argument_size_in_bytes,
                outputs=m.output_size_in_bytes, alias=m.alias_size_in_bytes, lower_s=round(t1 - t0, 1),
                compile_s=round(t2 - t1, 1), host_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                 * 1024 / GIB, 2),
                jax=jax.__version__, platform=jax.devices()[0].platform, n_devices=len(jax.devices()), **res)


def worker_env(args) -> dict:
    env = dict(os.environ)
    flags = [env.get("XLA_FLAGS", ""), DEVICE_COUNT]
    if args.cpu_scheduler == "memory":
        flags.append(CPU_MEMORY_SCHEDULER)
    if not args.ynn:
        flags.append(NO_YNN)
    if args.cpu_remat == "keep":
        flags.append(KEEP_REMAT)
    env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_cell(cell: dict, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cell)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=worker_env(args), capture_output=True, text=True, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        return dict(cell, error=f"timed out after {args.cell_timeout} s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
        how = f"killed by signal {-p.returncode} (out of host memory?)" if p.returncode < 0 else f"rc {p.returncode}"
        return dict(cell, error=f"{how}: {tail}", wall_s=round(time.perf_counter() - t0, 1))
    return dict(json.loads(lines[-1][len("RESULT "):]), wall_s=round(time.perf_counter() - t0, 1))


def fmt_row(r: dict) -> str:
    head = (f"{r['size']:>11} {r['form']:>7} {r['trainable']:>8} {r['remat']:>19} {r['devices']:>3} "
            f"{r.get('cpu_remat', 'undone'):>6} |")
    g = lambda k: r[k] / GIB
    res = f"{g('residuals'):9.2f}" if "residuals" in r else f"{'-':>9}"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    if "peak" not in r:  # residuals only (--residuals-only)
        return f"{head} {'not compiled':>44} | {res} |"
    return (f"{head} {g('peak'):8.2f} {g('arguments'):9.2f} {g('outputs'):7.2f} {g('alias'):7.2f} {g('temp'):8.2f} "
            f"| {res} | {r['compile_s']:8.1f} {r['host_rss_gib']:6.1f}")


HEADER = (f"{'F x H x W':>11} {'batch':>7} {'trained':>8} {'remat':>19} {'dev':>3} {'recomp':>6} | {'peak GiB':>8} "
          f"{'arguments':>9} "
          f"{'outputs':>7} {'aliased':>7} {'temps':>8} | {'residuals':>9} | {'compile s':>8} {'RSS GiB':>6}")


def print_table(rows: list[dict]) -> None:
    order = {"14x320x576": 0, "14x576x1024": 1, "25x576x1024": 2}
    key = lambda r: (r["form"] != "latents", r["devices"], order.get(r["size"], 9), r["trainable"] != "full",
                     REMAT_ORDER.index(r["remat"]) if r["remat"] in REMAT_ORDER else 9, r.get("cpu_remat") != "kept")
    print("Per device; GiB = 2^30 bytes; peak = arguments + outputs + temporaries - aliased (XLA:CPU memory_analysis);")
    print("residuals: the arrays JAX's autodiff saves from the forward for the backward, per clip (jaxpr of the loss's")
    print("vjp, before XLA; weights referenced by them not counted; '-': not computed, it equals the 1-device cell's);")
    print("recomp: 'kept' = compiled with --cpu-remat keep (XLA:CPU keeps jax.checkpoint's recomputation), 'undone' =")
    print("XLA:CPU's default pipeline (it merges the recomputation away); '-' residuals-only rows were not compiled")
    print(HEADER)
    for r in sorted(rows, key=key):
        print(fmt_row(r))
    print()
    print(f"Goals (full fine-tuning, {GOAL_SIZE}, pre-encoded latents, best remat policy measured, recomputation "
          f"kept):")
    for dev, goal in GOALS.items():
        cand = [r for r in rows if r["size"] == GOAL_SIZE and r["trainable"] == "full" and r["devices"] == dev
                and r["form"] == "latents" and "peak" in r and r.get("cpu_remat") == "kept"]
        where = "one device" if dev == 1 else f"{dev} devices (per device)"
        if not cand:
            print(f"  {where}: <= {goal:.0f} GiB: not measured")
            continue
        best = min(cand, key=lambda r: r["peak"])
        ok = "PASS" if best["peak"] / GIB <= goal else "FAIL"
        allr = ", ".join(f"{r['remat']} {r['peak'] / GIB:.2f}" for r in sorted(cand, key=lambda r: r["peak"]))
        missing = [p for p in REMAT_ORDER if p not in {r["remat"] for r in cand}]
        allr += f"; not measured: {', '.join(missing)}" if missing else ""
        print(f"  {where}: <= {goal:.0f} GiB: {ok} (best remat={best['remat']}: {best['peak'] / GIB:.2f} GiB; "
              f"{allr})")
    cand = [r for r in rows if r["size"] == GOAL_SIZE and r["trainable"].startswith("lora") and r["devices"] == 1
            and r["form"] == "latents" and "peak" in r and r.get("cpu_remat") == "kept"]
    if cand:
        for rank in sorted({r["trainable"] for r in cand}):
            best = min((r for r in cand if r["trainable"] == rank), key=lambda r: r["peak"])
            ok = "PASS" if best["peak"] / GIB <= LORA_GOAL else "FAIL"
            print(f"  LoRA {rank[4:]}, one device: <= {LORA_GOAL:.0f} GiB: {ok} (best remat={best['remat']}: "
                  f"{best['peak'] / GIB:.2f} GiB)")
    else:
        print(f"  LoRA, one device: <= {LORA_GOAL:.0f} GiB: not measured")
    print("  Caveat: XLA:CPU's memory estimate; a TPU/GPU compile schedules and rematerialises differently.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--sizes", default="14x320x576,14x576x1024,25x576x1024", help="frames x height x width (pixels)")
    ap.add_argument("--remat", default=",".join(REMAT_ORDER), help="remat policies (svd_jax/options.py)")
    ap.add_argument("--trainable", default="full,temporal",
                    help="full, temporal and/or lora<rank> (e.g. lora16,lora64: an adapter on the default targets)")
    ap.add_argument("--devices", default="1,8", help="1 (batch 1) and/or 8 (batch 8 on an 8-device FSDP mesh)")
    ap.add_argument("--pixel-case", default=f"{GOAL_SIZE},blocks,full,1",
                    help="size,remat,trainable,devices of one cell also compiled with the pixel batch form "
                         "('none': skip)")
    ap.add_argument("--no-state-report", action="store_true", help="skip the state-bytes report")
    ap.add_argument("--cpu-scheduler", choices=("memory", "concurrency"), default="memory",
                    help="XLA:CPU's scheduler: memory-minimising, or its default (concurrency-optimised)")
    ap.add_argument("--ynn", action="store_true", help="keep XLA's default CPU YNNPACK fusions")
    ap.add_argument("--cpu-remat", choices=("keep", "xla-default"), default="keep",
                    help="keep jax.checkpoint's recomputation in XLA:CPU (see above), or XLA:CPU's default")
    ap.add_argument("--jobs", type=int, default=1, help="compiles at once (each needs ~3.5 GB of host RAM)")
    ap.add_argument("--cell-timeout", type=int, default=3600, help="seconds per compile")
    ap.add_argument("--residuals-only", action="store_true",
                    help="no compile: only the autodiff residuals of the 1-device cells (seconds each)")
    ap.add_argument("--jsonl", help="append each cell's result to this file (JSON lines)")
    ap.add_argument("--table-from", help="print the table and goals of the results in this JSON-lines file; no compile")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.table_from:
        with open(args.table_from) as fh:
            rows = {}
            for line in fh:
                r = json.loads(line)
                key = (r["size"], r["form"], r["trainable"], r["remat"], r["devices"], r.get("cpu_remat", "-"))
                old = rows.get(key, {})
                if "error" in r and "peak" in old:  # a failed retry does not hide a measurement
                    continue
                if "peak" in r:
                    old.pop("error", None)
                rows[key] = {**old, **r}  # a cell's latest values (compile and --residuals-only runs merge)
        compiled = {k[:5] for k, r in rows.items() if "peak" in r or "error" in r}
        for k, r in list(rows.items()):  # residuals-only rows: their value goes to the compiled rows of the cell
            if k[5] == "-":
                for k2, r2 in rows.items():
                    if k2[:5] == k[:5] and k2[5] != "-":
                        r2.setdefault("residuals", r["residuals"])
                if k[:5] in compiled:
                    del rows[k]
        print_table(list(rows.values()))
        return

    os.environ.update({k: v for k, v in worker_env(args).items() if k in ("XLA_FLAGS", "JAX_PLATFORMS")})
    import jax

    print(f"SVD-XT fine-tuning step (AdamW, float32 weights/moments/gradients, bfloat16 compute), "
          f"jax {jax.__version__}, {jax.devices()[0].platform}, {datetime.date.today()}")
    print(f"  XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    print(f"  command: python {' '.join(sys.argv)}")
    if not args.no_state_report:
        print("\nTrain state bytes (GiB) from step.abstract_state (float32, LoRA's frozen base bf16; AdamW mu + nu"
              " for the trained weights):")
        print(f"  {'trained':>8} {'devices':>7} | {'#trained':>8} {'#frozen':>7} | {'trained W':>9} {'frozen W':>8} "
              f"{'AdamW':>7} {'state':>7} | {'+ grads':>7}")
        for dev in sorted({1, *(int(d) for d in args.devices.split(","))}):
            for r in state_report(dev):
                g = lambda k: r[k] / GIB
                print(f"  {r['trainable']:>8} {dev:>7} | {r['n_trained']:8d} {r['n_frozen']:7d} | {g('trained'):9.2f} "
                      f"{g('frozen'):8.2f} {g('opt_state'):7.2f} {g('total'):7.2f} | {g('total') + g('grads'):7.2f}")
        print("  (per device under FSDP: a leaf split if its spec splits it, else whole on every device)")

    rc = "-" if args.residuals_only else {"keep": "kept", "xla-default": "undone"}[args.cpu_remat]
    cells = [dict(size=s, remat=r, trainable=t, devices=int(d), form="latents", cpu_remat=rc)
             for d in args.devices.split(",") for s in args.sizes.split(",") for t in args.trainable.split(",")
             for r in args.remat.split(",")]
    if args.pixel_case != "none":
        s, r, t, d = args.pixel_case.split(",")
        cells.append(dict(size=s, remat=r, trainable=t, devices=int(d), form="pixels", cpu_remat=rc))
    if args.residuals_only:
        cells = [c for c in cells if c["devices"] == 1]
    what = "residuals (tracing only)" if args.residuals_only else "compiles, one subprocess each"
    print(f"\n{len(cells)} {what}:\n{HEADER}", flush=True)
    rows = []

    def record(r):
        rows.append(r)
        print(fmt_row(r), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(r) + "\n")

    if args.residuals_only:
        for cell in cells:
            new, refs = saved_residuals(*build(cell["trainable"], cell["remat"], cell["size"], 1, cell["form"]))
            record(dict(cell, residuals=new, residual_args=refs))
    else:  # XLA compiles are mostly single-threaded: --jobs 2 on 2 cores nearly halves the wall time
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for fut in concurrent.futures.as_completed([pool.submit(run_cell, c, args) for c in cells]):
                record(fut.result())
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
