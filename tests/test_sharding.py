"""Sharded generation on 8 CPU devices (subprocess, forced device count) equals the one-device run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from svd_jax.sharding import Partitioner, make_mesh

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def sharded(tiny_pipeline):
    _, folder = tiny_pipeline
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # the script adds the forced device count
    proc = subprocess.run([sys.executable, str(HERE / "sharded_run.py"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
@pytest.mark.parametrize("case,videos", [("batch4", 4), ("single", 1)])
def test_sharded_equals_single_device(sharded, mesh, case, videos):
    r = sharded[mesh]
    print(mesh, case, r[f"{case}_max_abs_diff"])
    assert r[f"{case}_shape"][0] == videos
    assert r[f"{case}_max_abs_diff"] <= 1e-3
    assert r[f"{case}_latent_devices"] == 8 and not r[f"{case}_latent_replicated"]  # really spread
    assert r["params_on_devices"] == 8


def test_uneven_batch_is_padded_and_cropped(sharded):
    """3 videos on a data axis of 2: padded to 4 inside, cropped back, equal to the one-device run."""
    r = sharded["2x4"]
    assert r["odd3_shape"][0] == 3
    assert r["odd3_max_abs_diff"] <= 1e-3


def test_make_mesh_and_rules():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "space") and mesh.size == len(jax.devices())
    with pytest.raises(ValueError, match="must use all"):
        make_mesh(data=len(jax.devices()) + 1, space=1)
    part = Partitioner(make_mesh(), fsdp=True)
    n = part.size
    assert part.param_spec((3, 5 * n))[1] == ("data", "space")  # the divisible dimension is split
    assert Partitioner(make_mesh()).param_spec((4 * n, 4 * n)) == jax.sharding.PartitionSpec()


def test_multihost_two_processes(tiny_pipeline, tmp_path):
    """2 processes x 4 CPU devices after jax.distributed.initialize: every process gets the full frames,
    equal to the one-device run."""
    import socket

    import PIL.Image

    from svd_jax import StableVideoDiffusionPipeline

    _, folder = tiny_pipeline
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_run.py"), str(folder), str(port), str(i),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    img = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    ref = StableVideoDiffusionPipeline.from_pretrained(folder)(
        img, height=64, width=48, num_frames=3, num_inference_steps=2, decode_chunk_size=2, seed=0,
        num_videos_per_prompt=2, output_type="np").frames
    for i in range(2):
        got = np.load(tmp_path / f"frames_{i}.npy")
        assert got.shape == ref.shape == (2, 3, 64, 48, 3)
        assert np.abs(got - ref).max() <= 1e-3
