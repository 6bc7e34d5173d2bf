"""Run by test_training_sharded.py in a subprocess with 8 forced CPU devices: the train step on a mesh vs one device.

    python tests/train_sharded_run.py PIPELINE_FOLDER   -> prints one JSON line of measurements

Three TrainSteps of one config on the same parameters and batches: no partitioner (one device), FSDP on a
data=8 mesh and FSDP on a data=4 x space=2 mesh (clips over data, their height over space). Each takes STEPS
steps from the same parameters; the script reports the losses, the largest parameter and Adam-moment differences
to the one-device run, where the state and the batch live, and how much of the input state the step consumed
(donation). Three step compiles in all (plus the three small state inits): the subprocess is compile-bound.
"""

import json
import os
import re
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from svd_jax import StableVideoDiffusionPipeline  # noqa: E402
from svd_jax.sharding import Partitioner, make_mesh  # noqa: E402
from svd_jax.training import TrainConfig, TrainStep  # noqa: E402
from svd_jax.training.step import flatten_params  # noqa: E402

# 32 x 32 pixels: latents 4 x 4, the UNet's lower level 2 x 2. Not 16 x 16: there that level is 1 x 1 and its
# GroupNorms (2 channels per group) normalise 2 numbers, which makes the float32 gradient of the tiny UNet
# ill-conditioned (one device is 2 % off a float64 reference on some leaves) and no two roundings comparable.
B, F, H, W = 8, 2, 32, 32
STEPS = 2
MESHES = {"8x1": (8, 1), "4x2": (4, 2)}
# float32 compute. Adam's epsilon above the gradients' rounding noise: with a tiny epsilon an element whose
# gradient is float noise (or changes sign within rounding) moves by +-lr whichever way the noise falls, in any
# two differently rounded runs; here the update is smooth in the gradient, so equal gradients give equal weights.
# The learning rate moves the weights well past float32 resolution; the clipping (global norm over the sharded
# leaves) acts on the first step.
CONFIG = dict(num_frames=F, height=H, width=W, batch_size=B, max_steps=10, dtype="float32", learning_rate=1e-3,
              adam_eps=1e-3, max_grad_norm=0.1)


def batch(seed):
    rng = np.random.default_rng(seed)
    return {"pixels": rng.uniform(-1, 1, (B, F, H, W, 3)).astype(np.float32),
            "fps": rng.integers(4, 30, (B,)).astype(np.float32),
            "motion_bucket_id": rng.integers(0, 255, (B,)).astype(np.float32)}


def opt_leaves(opt_state):
    """{path: array} of the optimizer state's arrays (not the scalar counters), e.g. ``[1][0].mu['conv_in.kernel']``."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(opt_state) if np.ndim(x)}


def run(ts, params, enc, batches):
    """STEPS steps from ``params``: (final state, losses, grad norms, the first step's donation counts)."""
    state = ts.init(params)
    losses, norms, donated = [], [], None
    for b in batches:
        old = state
        state, m = ts(state, b, enc)
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
        if donated is None:
            old_leaves, new_leaves = jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(state)
            donated = {"leaves": len(old_leaves), "deleted": sum(x.is_deleted() for x in old_leaves),
                       "new_deleted": sum(x.is_deleted() for x in new_leaves)}
    return state, losses, norms, donated


def shard_sizes(x):
    return sorted({int(s.data.size) for s in x.addressable_shards})


def main():
    folder = sys.argv[1]
    assert len(jax.devices()) == 8, jax.devices()
    t0 = time.perf_counter()
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder, dtype="float32")
    params = pipe.params["unet"]
    enc = {"vae": pipe.params["vae"], "image_encoder": pipe.params["image_encoder"]}
    cfg = TrainConfig(**CONFIG)
    batches = [batch(s) for s in range(STEPS)]
    seconds = {"load": time.perf_counter() - t0}

    t = time.perf_counter()
    ref, ref_losses, ref_norms, ref_donated = run(TrainStep(pipe.unet, pipe.vae, pipe.image_encoder, cfg), params,
                                                  enc, batches)
    seconds["one_device"] = time.perf_counter() - t
    ref_p, ref_o = jax.device_get((ref.params, opt_leaves(ref.opt_state)))
    init_p = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    scale = max(float(np.abs(v).max()) for v in ref_p.values())
    moment_scale = {m: max(float(np.abs(v).max()) for k, v in ref_o.items() if f".{m}[" in k) for m in ("mu", "nu")}
    result = {"one_device": {
        "losses": ref_losses, "grad_norms": ref_norms, "donated": ref_donated, "param_scale": scale,
        "max_moved": max(float(np.abs(ref_p[k] - init_p[k]).max()) for k in ref_p),
        "moved_leaves": sum(not np.array_equal(ref_p[k], init_p[k]) for k in ref_p), "n_params": len(ref_p),
        "n_opt_arrays": len(ref_o), "moment_scale": moment_scale, "deleted_after": sum(
            x.is_deleted() for x in jax.tree_util.tree_leaves(ref))}}

    # the largest parameter whose largest dimension the 8 devices divide (FSDP splits it 8 ways)
    shapes = {k: np.shape(v) for k, v in ref_p.items()}
    big = max((k for k, s in shapes.items() if s and max(s) % 8 == 0), key=lambda k: (np.prod(shapes[k]), k))
    for name, (data, space) in MESHES.items():
        t = time.perf_counter()
        part = Partitioner(make_mesh(data=data, space=space), fsdp=True)
        ts = TrainStep(pipe.unet, pipe.vae, pipe.image_encoder, cfg, partitioner=part)
        # the batches placed by batch_sharding (jit refuses a committed argument laid out otherwise than its
        # in_shardings, so this is the layout the step computes on). Both placed: jax traces and compiles a jitted
        # function again when an argument that was a numpy array comes as a placed jax.Array, in_shardings or not.
        layout = ts.batch_sharding({k: v.shape for k, v in batches[0].items()})
        placed = [jax.device_put(b, layout) for b in batches]
        state, losses, norms, donated = run(ts, params, enc, placed)
        seconds[name] = time.perf_counter() - t
        got_p, got_o = state.params, opt_leaves(state.opt_state)
        p_diff = {k: float(np.abs(np.asarray(got_p[k]) - ref_p[k]).max()) for k in ref_p}
        worst = max(p_diff, key=p_diff.get)
        o_diff = {m: max(float(np.abs(np.asarray(got_o[k]) - ref_o[k]).max()) for k in ref_o if f".{m}[" in k)
                  for m in ("mu", "nu")}
        big_moments = {k: v for k, v in got_o.items() if k.endswith(f"[{big!r}]")}
        px = placed[0]["pixels"]
        result[name] = {
            "losses": losses, "grad_norms": norms, "donated": donated, "n_params": len(got_p),
            "max_param_diff": p_diff[worst], "worst_param": worst, "param_scale": scale,
            "max_moment_diff": o_diff, "moment_scale": moment_scale, "n_opt_arrays": len(got_o),
            "big_param": big, "big_size": int(np.prod(shapes[big])), "big_spec": str(got_p[big].sharding.spec),
            "big_devices": len(got_p[big].sharding.device_set), "big_shard_sizes": shard_sizes(got_p[big]),
            "big_moments": sorted(re.search(r"\.(\w+)\[", k).group(1) for k in big_moments),
            "big_moment_shard_sizes": sorted({n for x in big_moments.values() for n in shard_sizes(x)}),
            "big_moment_devices": sorted({len(x.sharding.device_set) for x in big_moments.values()}),
            "params_split": sum(not x.sharding.is_fully_replicated for x in got_p.values()),
            "frozen": len(state.frozen), "rng_replicated": bool(state.rng.sharding.is_fully_replicated),
            "pixels_spec": str(px.sharding.spec), "pixels_devices": len(px.sharding.device_set),
            "pixels_shard_shapes": sorted({tuple(s.data.shape) for s in px.addressable_shards}),
            "pixels_clip_ranges": sorted({(s.index[0].start, s.index[0].stop) for s in px.addressable_shards}),
        }
    seconds["total"] = time.perf_counter() - t0
    result["seconds"] = seconds
    result["big_param"] = big
    print(json.dumps(result))


if __name__ == "__main__":
    main()
