"""One process of a 2-process x 4-CPU-device run (jax.distributed over localhost) for test_convert.py: a converted
folder loads onto an FSDP mesh over all 8 devices, each process reading only the rows its own devices need.

    python tests/convert_multihost_run.py DIFFUSERS_FOLDER CONVERTED_FP32_FOLDER PORT PROCESS_ID OUT_DIR
Each process checks every shard it holds against the one-device load of the diffusers folder and writes
OUT_DIR/result_<id>.json.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    diffusers_folder, converted, port, pid, out_dir = sys.argv[1:6]
    pid = int(pid)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp
    import numpy as np

    from svd_jax.models import (
        AutoencoderKLTemporalDecoder,
        CLIPVisionModelWithProjection,
        UNetSpatioTemporalConditionModel,
    )
    from svd_jax.sharding import Partitioner, make_mesh

    part = Partitioner(make_mesh(), fsdp=True)
    out = {"devices": len(jax.devices()), "local_devices": len(jax.local_devices())}
    cases = [("unet", UNetSpatioTemporalConditionModel, jnp.float32),
             ("vae", AutoencoderKLTemporalDecoder, jnp.float32),
             ("image_encoder", CLIPVisionModelWithProjection, jnp.float32),
             ("unet", UNetSpatioTemporalConditionModel, jnp.bfloat16)]  # the last cast slice by slice
    for sub, cls, dtype in cases:
        key = f"{sub}_{jnp.dtype(dtype).name}"
        _, want = cls.from_pretrained(diffusers_folder, sub, dtype)  # one device, this process
        _, got = cls.from_pretrained(converted, sub, dtype, param_sharding=part.param_sharding)
        bad, split, not_from_row0 = [], 0, 0
        for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)):
            w = np.asarray(w)
            ok = (g.shape == w.shape and g.dtype == w.dtype
                  and g.sharding.is_equivalent_to(part.param_sharding(g.shape), g.ndim)
                  and len(g.addressable_shards) == 4
                  and all(np.array_equal(np.asarray(s.data), w[s.index]) for s in g.addressable_shards))
            if not ok:
                bad.append(jax.tree_util.keystr(path))
            if part.param_spec(g.shape) != jax.sharding.PartitionSpec():
                split += all(s.data.size * 8 == g.size for s in g.addressable_shards)
                not_from_row0 += min(s.index[0].indices(g.shape[0])[0] for s in g.addressable_shards) > 0
        out[key] = {"bad": bad, "split": split, "not_from_row0": not_from_row0}
    with open(os.path.join(out_dir, f"result_{pid}.json"), "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
