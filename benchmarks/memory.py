"""Peak memory of the whole jitted SVD-XT generation on ONE device, from the compiled program on abstract
shapes (no weights, nothing allocated): for several decode_chunk_size values and attention backends.

    python benchmarks/memory.py [--chunks 1,2,4,8,25 --backends auto,xla,blockwise --dtype bfloat16]

Peak = arguments (weights + inputs) + outputs + temporaries - aliased, from XLA's memory_analysis() of this
machine's backend (CPU here; a TPU/GPU compile schedules differently, so treat the numbers as the program's
needs as XLA CPU lays it out). SVD-XT: 25 frames 576x1024, CFG, 25 steps.

On CPU, ``--cpu-scheduler memory`` (the default) compiles with XLA:CPU's memory-minimising scheduler
(``--xla_cpu_enable_concurrency_optimized_scheduler=false``): XLA:CPU's own default starts independent work
early so that its threads have more to run in parallel, which holds more buffers at once; a TPU or GPU compile
schedules to fit its memory. ``--cpu-scheduler concurrency`` measures with XLA:CPU's default. The flag can only
be set before jax starts (it is an XLA_FLAGS entry; per-compile options do not reach the scheduler).
"""

from __future__ import annotations

import argparse
import os
import time

GIB = 2**30
CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", default="1,2,4,8,25", help="decode_chunk_size values")
    ap.add_argument("--backends", default="auto,xla,blockwise")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cpu-scheduler", choices=("memory", "concurrency"), default="memory",
                    help="XLA:CPU's scheduler: memory-minimising, or its default (concurrency-optimised)")
    args = ap.parse_args()
    if args.cpu_scheduler == "memory":  # before jax reads XLA_FLAGS
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_MEMORY_SCHEDULER}".strip()
    import jax
    import jax.numpy as jnp

    from svd_jax.configs import abstract_pipeline

    dt = getattr(jnp, args.dtype)
    platform = jax.devices()[0].platform
    sched = f", XLA:CPU {args.cpu_scheduler} scheduler" if platform == "cpu" else ""
    print(f"SVD-XT whole generation, {args.frames} frames {args.width}x{args.height}, CFG, {args.steps} steps, "
          f"{args.dtype}, one {platform} device{sched}")
    print(f"{'attention':>10} {'decode chunk':>12} | {'peak GiB':>8} {'weights+inputs':>14} {'temporaries':>11} "
          f"| compile s")
    for backend in args.backends.split(","):
        pipe = abstract_pipeline(dt, attention=backend)
        for chunk in (int(c) for c in args.chunks.split(",")):
            t = time.perf_counter()
            compiled = pipe.lower(height=args.height, width=args.width, num_frames=args.frames,
                                  num_inference_steps=args.steps, decode_chunk_size=chunk).compile()
            m = compiled.memory_analysis()
            print(f"{backend:>10} {chunk:>12} | {peak_bytes(compiled) / GIB:8.2f} "
                  f"{m.argument_size_in_bytes / GIB:14.2f} {m.temp_size_in_bytes / GIB:11.2f} "
                  f"| {time.perf_counter() - t:9.1f}", flush=True)


if __name__ == "__main__":
    main()
