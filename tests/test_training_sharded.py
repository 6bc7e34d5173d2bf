"""The train step on 8 CPU devices (a subprocess with a forced device count, tests/train_sharded_run.py) equals the
one-device step: FSDP on a data=8 mesh and on a data=4 x space=2 mesh, two steps from the same weights on the same
pixel batches give the same losses, gradient norms, weights and Adam moments; the state is really split over the
devices, the batch over them along clips (and rows), and the step consumes (donates) its input state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow  # three partitioned compiles: minutes on CPU, like the other multi-device runs
MESHES = ("8x1", "4x2")


@pytest.fixture(scope="module")
def result(tiny_pipeline, fast_xla_flags):
    """The script's measurements. Compiled with the fast codegen flags (conftest.py): the three runs compared all
    use them, in one process."""
    _, folder = tiny_pipeline
    env = dict(os.environ, XLA_FLAGS=fast_xla_flags())
    proc = subprocess.run([sys.executable, str(HERE / "train_sharded_run.py"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print("train_sharded_run:", json.dumps(r))
    return r


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_one_device_run_moves_every_weight(result):
    """The reference the sharded runs are held to: two finite, clipped steps that move every weight well past the
    tolerance of the comparison below."""
    ref = result["one_device"]
    assert len(ref["losses"]) == 2 and all(0 < x < 10 for x in ref["losses"]), ref["losses"]
    assert min(ref["grad_norms"]) > 0.1  # above max_grad_norm: the clipping acted on both steps
    assert ref["moved_leaves"] == ref["n_params"] > 300
    assert ref["max_moved"] > 20 * 1e-5 * ref["param_scale"], (ref["max_moved"], ref["param_scale"])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_equal_one_device(result, mesh):
    """Per step the loss and the (unclipped) global gradient norm; after both steps every trained weight (within
    1e-5 of the weights' scale) and both Adam moments (within 1e-4 of each moment's scale)."""
    ref, r = result["one_device"], result[mesh]
    assert len(r["losses"]) == len(ref["losses"]) == 2
    assert _rel(r["losses"], ref["losses"]) <= 1e-5, (r["losses"], ref["losses"])
    assert _rel(r["grad_norms"], ref["grad_norms"]) <= 1e-5, (r["grad_norms"], ref["grad_norms"])
    assert r["n_params"] == ref["n_params"] and r["n_opt_arrays"] == ref["n_opt_arrays"] == 2 * ref["n_params"]
    assert r["max_param_diff"] <= 1e-5 * ref["param_scale"], (r["max_param_diff"], r["worst_param"])
    for m in ("mu", "nu"):
        assert r["max_moment_diff"][m] <= 1e-4 * ref["moment_scale"][m], (m, r["max_moment_diff"], r["moment_scale"])


@pytest.mark.parametrize("mesh", MESHES)
def test_state_is_split_over_the_devices(result, mesh):
    """FSDP: a weight whose largest dimension 8 divides lives as 8 shards of 1/8 of it, and so do its Adam moments;
    nearly every trained weight is split; the key is replicated."""
    r = result[mesh]
    assert r["big_devices"] == 8 and r["big_shard_sizes"] == [r["big_size"] // 8], r
    assert "('data', 'space')" in r["big_spec"], r["big_spec"]
    assert r["big_moments"] == ["mu", "nu"]
    assert r["big_moment_shard_sizes"] == [r["big_size"] // 8] and r["big_moment_devices"] == [8]
    assert r["params_split"] >= 0.9 * r["n_params"], (r["params_split"], r["n_params"])
    assert r["rng_replicated"]


def test_batch_is_split_along_clips_and_rows(result):
    """data=8: one clip per device; data=4 x space=2: two clips per device group, each device half of their rows."""
    one = result["8x1"]
    assert one["pixels_devices"] == 8 and one["pixels_shard_shapes"] == [[1, 2, 32, 32, 3]]
    assert one["pixels_clip_ranges"] == [[i, i + 1] for i in range(8)]
    two = result["4x2"]
    assert two["pixels_devices"] == 8 and two["pixels_shard_shapes"] == [[2, 2, 16, 32, 3]]
    assert two["pixels_clip_ranges"] == [[i, i + 2] for i in range(0, 8, 2)]
    assert all("'data', None, 'space', None, None" in r["pixels_spec"] for r in (one, two)), two["pixels_spec"]


@pytest.mark.parametrize("run", ("one_device",) + MESHES)
def test_step_donates_its_input_state(result, run):
    """Every buffer of the state passed to the step is deleted after it (donated to the new state), none of the
    new state's."""
    d = result[run]["donated"]
    assert d["leaves"] >= 3 * result[run]["n_params"] + 2  # weights, mu, nu, the counters, step, key
    assert d["deleted"] == d["leaves"] and d["new_deleted"] == 0, d
