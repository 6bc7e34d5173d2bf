"""Compile time of the whole SVD-XT generation, cold vs warm (persistent compilation cache), in two fresh
processes sharing one empty cache directory. Abstract shapes: no weights needed.

    python benchmarks/compile_time.py [--frames 25 --height 576 --width 1024 --steps 25 --chunk 8]

Each process builds the full-size pipeline with abstract parameters and times ``pipe.lower(...).compile()``:
the first compiles (and writes the cache), the second reads the executable back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
import jax.numpy as jnp
from svd_jax.configs import abstract_pipeline
a = json.loads(sys.argv[1])
pipe = abstract_pipeline(jnp.bfloat16)  # enables the persistent cache ($SVD_JAX_CACHE_DIR)
t = time.perf_counter()
lowered = pipe.lower(height=a["height"], width=a["width"], num_frames=a["frames"], num_inference_steps=a["steps"],
                     decode_chunk_size=a["chunk"])
t_lower = time.perf_counter() - t
lowered.compile()
print(json.dumps({"trace_s": t_lower, "total_s": time.perf_counter() - t}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--height", type=int, default=576)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="svd-jax-xla-") as cache:
        env = dict(os.environ, SVD_JAX_CACHE_DIR=cache)
        env.pop("SVD_JAX_COMPILE_CACHE", None)
        runs = []
        for name in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(vars(args))], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name}: trace {runs[-1]['trace_s']:.1f} s, trace + compile {runs[-1]['total_s']:.1f} s",
                  flush=True)
        print(f"warm / cold: {runs[1]['total_s'] / runs[0]['total_s']:.1%} (goal <= 10%)")


if __name__ == "__main__":
    main()
