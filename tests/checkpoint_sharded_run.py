"""Run by test_training_checkpoint.py in a subprocess with N forced CPU devices: a sharded train state saved
with TrainCheckpointer, or restored onto a mesh of N devices.

    python tests/checkpoint_sharded_run.py save DIRECTORY N      -> FSDP over N devices, saves step 5
    python tests/checkpoint_sharded_run.py restore DIRECTORY N   -> restores onto N devices, prints one JSON line
Both sides build the same values from fixed seeds (:func:`values`); the restore side compares bit for bit. The
test imports :func:`values` and :data:`SHAPES` to check its own one-device restore.
"""

import json
import os
import sys

if __name__ == "__main__":  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={int(sys.argv[3])}")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from svd_jax.sharding import AXES, Partitioner, make_mesh  # noqa: E402
from svd_jax.training.checkpoint import TrainCheckpointer  # noqa: E402

SHAPES = {"conv": (3, 3, 4, 16), "dense": (16, 8), "bias": (8,), "odd": (5, 3)}  # odd: no dim 8 divides


def values():
    """The state's values as numpy: params (float32, bias bfloat16), Adam-like moments, a step, PRNG keys."""
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    params["bias"] = params["bias"].astype(jax.numpy.bfloat16)
    mu = {k: (v * 0.5).astype(v.dtype) for k, v in params.items()}
    return {"params": params, "mu": mu, "step": np.int32(5),
            "key": np.asarray(jax.random.key_data(jax.random.key(7))),
            "keys": np.asarray(jax.random.key_data(jax.random.split(jax.random.key(8), 8)))}


def shardings(mesh, mode):
    """FSDP shardings (svd_jax.sharding.Partitioner): every parameter split over all devices where a dimension
    allows; on the restore side "dense" is split along the other axis than the rule's, to re-layout."""
    part = Partitioner(mesh, fsdp=True)
    params = {k: part.param_sharding(s) for k, s in SHAPES.items()}
    if mode == "restore":
        params["dense"] = NamedSharding(mesh, P(None, AXES))
    rep = NamedSharding(mesh, P())
    return {"params": params, "mu": dict(params), "step": rep, "key": rep, "keys": NamedSharding(mesh, P(AXES))}


def main():
    mode, directory, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert len(jax.devices()) == n, jax.devices()
    mesh = make_mesh(data=1, space=n)
    sh, v = shardings(mesh, mode), values()
    if mode == "save":
        state = jax.tree.map(lambda x, s: jax.device_put(x, s), v, sh)
        state["key"] = jax.device_put(jax.random.wrap_key_data(v["key"]), sh["key"])
        state["keys"] = jax.device_put(jax.random.wrap_key_data(v["keys"]), sh["keys"])
        with TrainCheckpointer(directory, fingerprint={"run": "fsdp"}) as ckpt:
            ckpt.save(5, state, {"data_position": 40})
        print(json.dumps({"devices": {k: len(x.sharding.device_set) for k, x in state["params"].items()},
                          "specs": {k: str(x.sharding.spec) for k, x in state["params"].items()},
                          "keys_spec": str(state["keys"].sharding.spec)}))
        return
    key_dtype = jax.random.key(0).dtype
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), v, sh)
    abstract["key"] = jax.ShapeDtypeStruct((), key_dtype, sharding=sh["key"])
    abstract["keys"] = jax.ShapeDtypeStruct((8,), key_dtype, sharding=sh["keys"])
    with TrainCheckpointer(directory, fingerprint={"run": "fsdp"}) as ckpt:
        state, meta = ckpt.restore(abstract)
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
    targets = jax.tree.leaves(abstract)
    expected = jax.tree.leaves(v)
    report = {"metadata": meta, "leaves": {}}
    for path, x, t, e in zip(paths, leaves, targets, expected):
        data = jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        report["leaves"][jax.tree_util.keystr(path)] = {
            "equal": np.asarray(data).tobytes() == np.asarray(e).tobytes(),
            "dtype": str(x.dtype), "want_dtype": str(t.dtype),
            "on_target": x.sharding == t.sharding, "devices": len(x.sharding.device_set),
            "spec": str(x.sharding.spec)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
