"""bf16 vs fp32: PSNR of the frames the same generation makes in each dtype (tiny random checkpoint, CPU).

    python benchmarks/precision.py [--model DIR] [--steps 4 --frames 4 --height 64 --width 96]

Without --model a tiny checkpoint is made in a temp dir (svd_jax.tiny; random weights, so the "video" is
noise, but every layer runs in the given dtype). Frames are compared in [0, 1]: PSNR = 10 log10(1 / MSE).
"""

from __future__ import annotations

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np
import PIL.Image

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.tiny import make_tiny_checkpoint


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny_checkpoint(tmp)
        img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8))
        kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                  seed=0, output_type="np")
        out = {}
        for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float16", jnp.float16)):
            out[name] = StableVideoDiffusionPipeline.from_pretrained(model, dtype=dt)(img, **kw).frames
        for name in ("bfloat16", "float16"):
            d = np.abs(out[name] - out["float32"])
            print(f"{name} vs float32: PSNR {psnr(out[name], out['float32']):.1f} dB, max abs diff {d.max():.4f}, "
                  f"mean abs diff {d.mean():.5f} (frames in [0, 1], {out[name].shape})")


if __name__ == "__main__":
    main()
