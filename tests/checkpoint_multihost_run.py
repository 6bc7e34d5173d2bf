"""One process of a 2-process x 2-CPU-device run (jax.distributed over localhost, gloo collectives): every process
saves the same globally sharded state with TrainCheckpointer and restores it onto another layout.

    python tests/checkpoint_multihost_run.py DIRECTORY PORT PROCESS_ID   -> prints one JSON line
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    directory, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from svd_jax.sharding import make_mesh
    from svd_jax.training.checkpoint import TrainCheckpointer

    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    mesh = make_mesh(data=2, space=2)
    full = {"w": np.arange(8 * 6, dtype=np.float32).reshape(8, 6), "v": np.arange(4, dtype=np.int32)}
    save_sh = {"w": NamedSharding(mesh, P(("data", "space"), None)), "v": NamedSharding(mesh, P("data"))}
    load_sh = {"w": NamedSharding(mesh, P("space", "data")), "v": NamedSharding(mesh, P())}
    make = lambda x, s, scale: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx] * scale)
    report = {}
    with TrainCheckpointer(directory, keep=1, fingerprint={"hosts": 2}) as ckpt:
        for step in (1, 2):
            state = {k: make(full[k], save_sh[k], step) for k in full}
            report[f"saved_{step}"] = ckpt.save(step, state, {"step": step})
        ckpt.wait()
        report["steps"] = ckpt.all_steps()
        abstract = {k: jax.ShapeDtypeStruct(full[k].shape, full[k].dtype, sharding=load_sh[k]) for k in full}
        restored, meta = ckpt.restore(abstract)
    report["metadata"] = meta
    report["equal"] = all(
        np.array_equal(np.asarray(shard.data), full[k][shard.index] * 2)
        for k, x in restored.items() for shard in x.addressable_shards)
    report["on_target"] = all(restored[k].sharding == load_sh[k] for k in full)
    report["addressable"] = {k: len(x.addressable_shards) for k, x in restored.items()}
    print(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
