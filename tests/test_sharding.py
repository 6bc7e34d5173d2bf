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


def test_constrained_models_equal_unconstrained(tiny_pipeline):
    """On 8 CPU devices (subprocess), the models with the mesh's block-boundary constraints give the same
    outputs as without, for both mesh shapes, and the UNet output really lives on all 8 devices."""
    _, folder = tiny_pipeline
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # the script adds the forced device count
    proc = subprocess.run([sys.executable, str(HERE / "sharded_models_run.py"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in r.items():
        if key.endswith("_devices"):
            # split over all 8 devices wherever the batch (B*F frames) divides the data axis
            assert value == 8 or key == "unet_2x4_b1_devices", key
        else:
            assert value <= 1e-5, (key, value)


def test_load_params_onto_a_mesh(tiny_pipeline):
    """Parameters placed on a mesh as they load equal the plain load."""
    from svd_jax.models import AutoencoderKLTemporalDecoder

    _, folder = tiny_pipeline
    part = Partitioner(make_mesh(), fsdp=True)
    _, plain = AutoencoderKLTemporalDecoder.from_pretrained(folder, "vae")
    _, placed = AutoencoderKLTemporalDecoder.from_pretrained(folder, "vae", param_sharding=part.param_sharding)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(placed)):
        assert isinstance(b.sharding, jax.sharding.NamedSharding)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_make_mesh_and_rules():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "space") and mesh.size == len(jax.devices())
    assert dict(mesh.shape) == ({"data": 2, "space": mesh.size // 2} if mesh.size % 2 == 0 else {"data": 1, "space": mesh.size})
    with pytest.raises(ValueError, match="must use all"):
        make_mesh(data=len(jax.devices()) + 1, space=1)
    part = Partitioner(make_mesh(), fsdp=True)
    n = part.size
    assert part.param_spec((3, 5 * n))[1] == ("data", "space")  # the divisible dimension is split
    assert Partitioner(make_mesh()).param_spec((4 * n, 4 * n)) == jax.sharding.PartitionSpec()

