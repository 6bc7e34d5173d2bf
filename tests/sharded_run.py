"""Run by test_sharding.py in a subprocess with 8 forced CPU devices: sharded generation vs one device.

    python tests/sharded_run.py PIPELINE_FOLDER   -> prints one JSON line of measurements
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

from svd_jax import StableVideoDiffusionPipeline  # noqa: E402
from svd_jax.sharding import make_mesh  # noqa: E402


def image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))


# Which cases run on which mesh (each is one more compile of the sharded program, so not every pair): space
# alone (1x8) with and without CFG; data x space (2x4) with a batch, one video whose CFG halves split the data
# axis, and an odd batch padded to the data axis. The latents of one case per mesh are checked for placement.
RUNS = {(1, 8): ("single", "single_nocfg"), (2, 4): ("batch4", "single", "odd3_nocfg")}
LATENT = {(1, 8): "single", (2, 4): "batch4"}


def main():
    folder = sys.argv[1]
    assert len(jax.devices()) == 8, jax.devices()
    kw = dict(height=64, width=48, num_frames=3, num_inference_steps=2, decode_chunk_size=2, seed=0)
    cases = {"batch4": dict(image=[image(1), image(2)], num_videos_per_prompt=2),  # CFG: UNet batch 8
             "single": dict(image=image(3)),  # CFG: UNet batch 2
             "single_nocfg": dict(image=image(3), max_guidance_scale=1.0),  # UNet batch 1
             "odd3_nocfg": dict(image=image(4), num_videos_per_prompt=3, max_guidance_scale=1.0)}  # padded
    ref_pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    ref = {k: ref_pipe(output_type="np", **c, **kw).frames for k, c in cases.items()}
    result = {}
    for data, space in [(1, 8), (2, 4)]:
        pipe = StableVideoDiffusionPipeline.from_pretrained(folder, mesh=make_mesh(data=data, space=space))
        leaf = jax.tree_util.tree_leaves(pipe.params["unet"])[0]
        r = {"params_on_devices": len(leaf.sharding.device_set)}
        for k in RUNS[(data, space)]:
            frames = pipe(output_type="np", **cases[k], **kw).frames
            r[f"{k}_max_abs_diff"] = float(np.abs(frames - ref[k]).max())
            r[f"{k}_shape"] = list(frames.shape)
        lat = pipe(output_type="latent", **cases[LATENT[(data, space)]], **kw).frames
        r["latent_devices"] = len(lat.sharding.device_set)
        r["latent_replicated"] = bool(lat.sharding.is_fully_replicated)
        r["latent_spec"] = str(lat.sharding.spec)
        result[f"{data}x{space}"] = r
    result["lora"] = lora_on_a_mesh(folder, ref_pipe, cases["single"], kw)
    print(json.dumps(result))


def lora_on_a_mesh(folder, ref_pipe, case, kw):
    """An adapter on an FSDP pipeline (1 x 8): fused kernels keep their base kernel's sharding, the unfused
    factors are spread like their base weights, and both videos equal the one-device pipeline's with it."""
    import tempfile

    from lora_helpers import random_lora

    from svd_jax.lora import save_lora

    with tempfile.TemporaryDirectory() as d:
        save_lora(random_lora(ref_pipe.params["unet"], seed=3), d)
        ref_pipe.load_lora_weights(d)
        ref = ref_pipe(output_type="np", **case, **kw).frames
        pipe = StableVideoDiffusionPipeline.from_pretrained(folder, mesh=make_mesh(data=1, space=8), fsdp=True)
        base = pipe.params["unet"]
        pipe.load_lora_weights(d)
    pairs = list(zip(jax.tree_util.tree_leaves(pipe.params["unet"]), jax.tree_util.tree_leaves(base)))
    r = {"fused_changed": sum(a is not b for a, b in pairs),
         "fused_same_sharding": all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in pairs),
         "base_split": sum(not b.sharding.is_fully_replicated for _, b in pairs)}
    r["fused_max_abs_diff"] = float(np.abs(pipe(output_type="np", **case, **kw).frames - ref).max())
    pipe.unfuse_lora()
    factors = jax.tree_util.tree_leaves(pipe.params["lora"])
    r["unfused_split"] = sum(not x.sharding.is_fully_replicated for x in factors)
    r["unfused_on_devices"] = min(len(x.sharding.device_set) for x in factors)
    r["unfused_max_abs_diff"] = float(np.abs(pipe(output_type="np", **case, **kw).frames - ref).max())
    return r


if __name__ == "__main__":
    main()
