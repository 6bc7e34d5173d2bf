"""TrainCheckpointer (svd_jax.training.checkpoint): resumable orbax checkpoints of a whole train state."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import SingleDeviceSharding

from svd_jax.training.checkpoint import CheckpointError, TrainCheckpointer
from svd_jax.weights.errors import CheckpointError as WeightsCheckpointError

HERE = Path(__file__).parent
FINGERPRINT = {"model": {"block_out_channels": [32, 64], "num_frames": 3}, "height": 64, "width": 48,
               "trainable": "temporal", "optimizer": {"name": "adamw", "lr": 1e-4}}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    ema: dict
    opt_state: optax.OptState
    rng: jax.Array  # jax.random.PRNGKey: uint32[2]
    key: jax.Array  # jax.random.key: a typed key
    keys: jax.Array  # typed keys, shape (3,), another implementation
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def make_state(seed: int = 0, updates: int = 3) -> TrainState:
    """A realistic state: float32 + bfloat16 params, MultiSteps(clip + adamw) and EMA states after a few updates
    (so every moment, accumulator and counter is away from its init), an int32 step, both kinds of PRNG key."""
    rng = np.random.default_rng(seed)
    params = {"unet": {"conv_in": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32),
                                   "bias": rng.standard_normal(8).astype(jnp.bfloat16)},
                       "time_mix": {"mix_factor": np.float32(rng.standard_normal())}},
              "proj": {"kernel": rng.standard_normal((8, 5)).astype(jnp.bfloat16)}}
    params = jax.tree.map(jnp.asarray, params)
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), every_k_schedule=2)
    ema_tx = optax.ema(0.9)
    opt_state, ema_state = tx.init(params), ema_tx.init(params)
    for _ in range(updates):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        upd, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, upd)
        _, ema_state = ema_tx.update(params, ema_state)
    return TrainState(step=jnp.int32(updates + seed), params=params, ema={"state": ema_state}, opt_state=opt_state,
                      rng=jax.random.PRNGKey(seed), key=jax.random.key(seed + 1),
                      keys=jax.random.split(jax.random.key(seed + 2, impl="rbg"), 3), tx=tx)


def raw(x) -> np.ndarray:
    """A leaf's bits as numpy (typed keys as their key data)."""
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_identical(got, want):
    """Same tree (incl. static fields), and every leaf has the same dtype, shape and bytes."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        where = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, (where, a.dtype, b.dtype)
        assert raw(a).shape == raw(b).shape and raw(a).tobytes() == raw(b).tobytes(), where


def abstract(state, sharding=None):
    """The state as ShapeDtypeStructs (what a trainer builds with jax.eval_shape), optionally with a sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_round_trip_realistic_state(tmp_path):
    """Save -> restore gives the identical tree: optax MultiSteps/adamw/EMA states, bf16 leaves, counters, both
    kinds of PRNG key (typed keys come back typed, of their implementation); metadata round-trips."""
    state = make_state()
    assert state.keys.dtype != state.key.dtype  # rbg and threefry: two key implementations
    meta = {"data_position": 1234, "epoch": 2, "shuffle": {"seed": 7, "order": [3, 1, 2]}, "note": "run-a"}
    with TrainCheckpointer(tmp_path / "ckpt", fingerprint=FINGERPRINT) as ckpt:
        assert ckpt.save(10, state, meta)
        ckpt.wait()
        assert ckpt.all_steps() == [10]
        got, got_meta = ckpt.restore(abstract(state))
        assert_identical(got, state)
        assert got_meta == meta
        assert isinstance(got.opt_state, optax.MultiStepsState) and got.tx is state.tx
        dev0 = SingleDeviceSharding(jax.devices()[0])
        assert all(x.sharding == dev0 for x in jax.tree.leaves(got))
        # concrete arrays as the target: their values are not used, only their kind and placement
        zeros = jax.tree.map(lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x * 0, state)
        got2, _ = ckpt.restore(zeros)
        assert_identical(got2, state)
    # numpy and Python leaves keep their kind; a fresh checkpointer (a resumed run) reads the same
    extra = {"np": np.arange(4, dtype=np.int64), "scalar": np.float32(2.5), "count": 7, "flag": True}
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 10
        ckpt.save(11, extra, force=True)
        ckpt.wait()
        got3, meta3 = ckpt.restore(extra)
    assert meta3 == {}
    assert isinstance(got3["np"], np.ndarray) and np.array_equal(got3["np"], extra["np"])
    assert type(got3["scalar"]) is np.float32 and got3["scalar"] == 2.5
    assert type(got3["count"]) is int and got3["count"] == 7 and got3["flag"] is True
    stored = json.loads((tmp_path / "ckpt" / "10" / "meta" / "metadata").read_text())
    assert stored["fingerprint"] == json.loads(json.dumps(FINGERPRINT)) and stored["metadata"] == meta
    assert {r["dtype"] for r in stored["leaves"]} >= {"float32", "bfloat16", "int32", "uint32", "key<fry>", "key<rbg>"}


def test_keep_latest_and_restore_older(tmp_path):
    """keep=2 with saves at 2, 4, 6: steps [4, 6] remain on disk, latest 6, restore(step=4) gets step 4."""
    states = {s: make_state(seed=s, updates=1) for s in (2, 4, 6)}
    with TrainCheckpointer(tmp_path, keep=2, save_every=2) as ckpt:
        for s, st in states.items():
            assert ckpt.save(s, st, {"step": s})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "6"]
        got4, meta4 = ckpt.restore(abstract(states[4]), step=4)
        assert_identical(got4, states[4]) and meta4 == {"step": 4}
        got6, meta6 = ckpt.restore(abstract(states[6]))
        assert_identical(got6, states[6]) and meta6 == {"step": 6}
        with pytest.raises(CheckpointError, match=r"step 2 .*complete steps are \[4, 6\]"):
            ckpt.restore(abstract(states[2]), step=2)


def test_save_policy(tmp_path):
    """should_save at multiples of save_every; save skips other steps and already saved ones, force replaces;
    a step older than the latest is refused; metadata must be JSON-able; a synchronous save is complete at once."""
    a, b = make_state(seed=0, updates=1), make_state(seed=1, updates=1)
    with TrainCheckpointer(tmp_path, save_every=3, async_save=False) as ckpt:
        assert [s for s in range(10) if ckpt.should_save(s)] == [3, 6, 9]
        assert not ckpt.save(4, a) and ckpt.all_steps() == []
        assert ckpt.save(3, a) and ckpt.all_steps() == [3]  # synchronous: complete without wait()
        assert not ckpt.save(3, b)  # already saved: kept
        assert_identical(ckpt.restore(abstract(a))[0], a)
        assert ckpt.save(3, b, force=True)  # replaced
        assert_identical(ckpt.restore(abstract(b))[0], b)
        assert ckpt.save(6, a)
        with pytest.raises(CheckpointError, match=r"newer steps \[6\]"):  # the run went back to step 3
            ckpt.save(4, a, force=True)
        ckpt.delete(6)
        assert ckpt.save(5, a, force=True) and ckpt.all_steps() == [3, 5]
        with pytest.raises(TypeError, match="metadata must be JSON-able"):
            ckpt.save(9, a, {"bad": object()})
    with TrainCheckpointer(tmp_path / "none") as ckpt:  # save_every None: no periodic saves, every save() saves
        assert not any(ckpt.should_save(s) for s in range(10))
        assert ckpt.save(7, a)
    with pytest.raises(TypeError, match="fingerprint"):
        TrainCheckpointer(tmp_path / "x", fingerprint={"dtype": jnp.float32})


def test_interrupted_save_is_ignored(tmp_path):
    """A save cut off before orbax's final rename (its temporary folder left behind, every file written) is not a
    checkpoint: the resumed run sees the last complete step, restores it, and saves that step again cleanly."""
    old, new = make_state(seed=0, updates=1), make_state(seed=1, updates=1)
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    with TrainCheckpointer(run) as ckpt:
        ckpt.save(4, old, {"at": 4})
    with TrainCheckpointer(scratch) as ckpt:
        ckpt.save(6, new, {"at": 6})
    leftover = run / "6.orbax-checkpoint-tmp-1700000000000000"
    shutil.move(scratch / "6", leftover)  # the crash: step 6 fully written but never renamed
    assert (leftover / "commit_success.txt").exists() and (leftover / "state").is_dir()
    with TrainCheckpointer(run) as ckpt:  # the resumed run
        assert ckpt.latest_step() == 4 and ckpt.all_steps() == [4]
        got, meta = ckpt.restore(abstract(old))
        assert_identical(got, old) and meta == {"at": 4}
        assert ckpt.save(6, new, {"at": 6})
        ckpt.wait()
        assert not leftover.exists()  # cleaned up by the checkpointer opening the directory
        assert ckpt.all_steps() == [4, 6]
        assert_identical(ckpt.restore(abstract(new))[0], new)
    # a partly written temporary folder (the crash earlier in the save) is ignored too
    partial = run / "8.orbax-checkpoint-tmp-1700000000000001"
    shutil.copytree(run / "6" / "meta", partial / "meta")
    with TrainCheckpointer(run) as ckpt:
        assert ckpt.latest_step() == 6


def _load_helper():
    spec = importlib.util.spec_from_file_location("checkpoint_sharded_run", HERE / "checkpoint_sharded_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_restore_onto_other_mesh(tmp_path):
    """Saved FSDP-split over 8 devices (subprocess), restored onto a 2-device mesh with other layouts
    (subprocess) and onto this process's one device: bit-identical values, on the requested shardings."""
    saved = _script(HERE / "checkpoint_sharded_run.py", "save", tmp_path, 8)
    assert saved["devices"] == {"conv": 8, "dense": 8, "bias": 8, "odd": 8}
    assert saved["specs"]["conv"] != "P()" and saved["specs"]["dense"] != "P()" and saved["keys_spec"] != "P()"
    r = _script(HERE / "checkpoint_sharded_run.py", "restore", tmp_path, 2)
    assert r["metadata"] == {"data_position": 40}
    assert len(r["leaves"]) == 11
    for path, leaf in r["leaves"].items():
        assert leaf["equal"] and leaf["on_target"] and leaf["dtype"] == leaf["want_dtype"], (path, leaf)
        assert leaf["devices"] == 2, (path, leaf)
    assert r["leaves"]["['params']['dense']"]["spec"] != saved["specs"]["dense"]  # re-laid out, not just re-split
    assert r["leaves"]["['keys']"]["dtype"] == "key<fry>"

    helper = _load_helper()
    want = helper.values()
    dev0 = SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev0), want)
    target["key"] = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=dev0)
    target["keys"] = jax.ShapeDtypeStruct((8,), jax.random.key(0).dtype, sharding=dev0)
    with TrainCheckpointer(tmp_path, fingerprint={"run": "fsdp"}) as ckpt:
        got, _ = ckpt.restore(target)
    for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
        assert x.sharding == dev0, jax.tree_util.keystr(path)
    got["key"], got["keys"] = jax.random.key_data(got["key"]), jax.random.key_data(got["keys"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_two_processes(tmp_path):
    """jax.distributed with 2 processes x 2 CPU devices: both call save and restore; each holds only its shards
    of the global arrays; keep=1 leaves the newest step; the restore onto another layout is exact."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    argv = lambda i: [sys.executable, str(HERE / "checkpoint_multihost_run.py"), str(tmp_path), str(port), str(i)]
    procs = [subprocess.Popen(argv(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
        r = json.loads(out.strip().splitlines()[-1])
        assert r["saved_1"] and r["saved_2"] and r["steps"] == [2] and r["metadata"] == {"step": 2}
        assert r["equal"] and r["on_target"] and r["addressable"] == {"v": 2, "w": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]


def test_mismatches_are_named(tmp_path):
    """Fingerprint, tree, shape and dtype mismatches and a missing checkpoint: CheckpointError saying what."""
    assert issubclass(CheckpointError, WeightsCheckpointError) and issubclass(CheckpointError, ValueError)
    state = make_state(updates=1)
    with TrainCheckpointer(tmp_path / "run", fingerprint=FINGERPRINT) as ckpt:
        ckpt.save(1, state)
    changed = dict(FINGERPRINT, height=128, model=dict(FINGERPRINT["model"], num_frames=14), extra=(1, 2))
    with TrainCheckpointer(tmp_path / "run", fingerprint=changed) as ckpt, \
            pytest.raises(CheckpointError, match="other settings") as e:
        ckpt.restore(abstract(state))
    msg = str(e.value)
    assert "height: stored 64, current 128" in msg and "model.num_frames: stored 3, current 14" in msg
    assert "extra: stored <absent>, current [1, 2]" in msg and "width" not in msg
    assert "resume with the same settings or start a new output dir" in msg

    ckpt = TrainCheckpointer(tmp_path / "run", fingerprint=json.loads(json.dumps(FINGERPRINT)))
    bad_shape = abstract(state).replace(params={**abstract(state).params, "proj": {
        "kernel": jax.ShapeDtypeStruct((8, 6), jnp.bfloat16)}})
    with pytest.raises(CheckpointError, match=r"\.params\['proj'\]\['kernel'\] is stored as bfloat16\[8, 5\], "
                                              r"the target is bfloat16\[8, 6\]"):
        ckpt.restore(bad_shape)
    bad_dtype = abstract(state).replace(step=jax.ShapeDtypeStruct((), jnp.float32))
    with pytest.raises(CheckpointError, match=r"leaf \.step is stored as int32"):
        ckpt.restore(bad_dtype)
    renamed = abstract(state).replace(ema={"ema_state": abstract(state).ema["state"]})
    with pytest.raises(CheckpointError, match=r"first mismatching leaf #\d+: stored \.ema\['state'\]"):
        ckpt.restore(renamed)
    other_key = abstract(state).replace(keys=abstract(state).key)  # one threefry key where 3 rbg keys are stored
    with pytest.raises(CheckpointError, match=r"\.keys is stored as key<rbg>\[3\], the target is key<fry>\[\]"):
        ckpt.restore(other_key)
    assert_identical(ckpt.restore(abstract(state))[0], state)  # the matching target still restores
    ckpt.close()

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with TrainCheckpointer(folder) as ckpt, pytest.raises(CheckpointError, match="no checkpoint found in") as e:
            ckpt.restore(abstract(state))
        assert str(folder) in str(e.value)
