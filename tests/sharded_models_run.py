"""Run by test_sharding.py in a subprocess with 8 forced CPU devices: the UNet and the VAE decoder with the
mesh's block-boundary constraints (svd_jax.sharding.Partitioner) equal the unconstrained modules.

    python tests/sharded_models_run.py PIPELINE_FOLDER   -> prints one JSON line of max relative errors
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from svd_jax.models import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel  # noqa: E402
from svd_jax.sharding import Partitioner, make_mesh  # noqa: E402


def rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def main():
    folder = sys.argv[1]
    unet, up = UNetSpatioTemporalConditionModel.from_pretrained(folder, "unet")
    vae, vp = AutoencoderKLTemporalDecoder.from_pretrained(folder, "vae")
    rng = np.random.default_rng(0)
    out = {}
    for data, space in [(1, 8), (2, 4)]:
        part = Partitioner(make_mesh(data=data, space=space))
        # activations pinned at block boundaries, convolution kernels pinned at use (Partitioner.model_options)
        uc, vc = (m.clone(options=part.model_options(m.options)) for m in (unet, vae))
        upm, vpm = jax.device_put((up, vp), part.sharding(jax.sharding.PartitionSpec()))  # as the pipeline has them
        for b in (1, 2):
            x = rng.normal(size=(b, 3, 8, 6, 8)).astype(np.float32)
            e = rng.normal(size=(b, 1, 32)).astype(np.float32)
            ids = np.ones((b, 3), np.float32)
            f = lambda m, p: jax.jit(lambda p, *a: m.apply({"params": p}, *a).sample)(p, x, 0.5, e, ids)
            y = f(unet, up)
            yc = f(uc, upm)
            out[f"unet_{data}x{space}_b{b}"] = rel(yc, y)
            out[f"unet_{data}x{space}_b{b}_devices"] = len(yc.sharding.device_set)
        z = rng.normal(size=(4, 8, 6, 4)).astype(np.float32)
        g = lambda m, p: jax.jit(lambda p, z: m.apply({"params": p}, z, num_frames=2, method="decode"))(p, z)
        y = g(vae, vp)
        out[f"vae_{data}x{space}"] = rel(g(vc, vpm), y)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
