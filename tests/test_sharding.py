"""Sharded generation on 8 CPU devices (subprocesses with a forced device count) equals the one-device run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import PIL.Image
import pytest

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.sharding import Partitioner, make_mesh

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def env(fast_xla_flags):
    """The scripts' environment: they add their forced device count to XLA_FLAGS. Compiled fast (conftest.py):
    these runs compare sharded with one-device programs built with the same flags; partitioning (HLO passes)
    is unaffected by the CPU code generator's options."""
    return dict(os.environ, XLA_FLAGS=fast_xla_flags())


@pytest.fixture(scope="module")
def sharded(tiny_pipeline, env):
    _, folder = tiny_pipeline
    proc = subprocess.run([sys.executable, str(HERE / "sharded_run.py"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh,case,videos", [("1x8", "single", 1), ("2x4", "batch4", 4), ("2x4", "single", 1)])
def test_sharded_equals_single_device(sharded, mesh, case, videos):
    """One video (CFG) on both mesh shapes and 2 images x 2 videos on 2x4: the frames equal the one-device run."""
    r = sharded[mesh]
    assert r[f"{case}_shape"][0] == videos
    assert r[f"{case}_max_abs_diff"] <= 1e-3, r[f"{case}_max_abs_diff"]
    assert r["params_on_devices"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("mesh,axes", [("1x8", ["'space'"]), ("2x4", ["'data'", "'space'"])])
def test_latents_stay_spread(sharded, mesh, axes):
    """output_type="latent" returns the latents spread over all 8 devices (not gathered, not replicated)."""
    r = sharded[mesh]
    assert r["latent_devices"] == 8 and not r["latent_replicated"], r["latent_spec"]
    assert all(a in r["latent_spec"] for a in axes), r["latent_spec"]  # videos over data, rows over space


@pytest.mark.slow
def test_sharded_without_cfg(sharded):
    """One video without CFG (a UNet batch of 1) on 1x8: every device works on rows of the same frames."""
    assert sharded["1x8"]["single_nocfg_max_abs_diff"] <= 1e-3


@pytest.mark.slow
def test_uneven_batch_is_padded_and_cropped(sharded):
    """3 videos without CFG on a data axis of 2: padded to 4 inside, cropped back, equal to the one-device run."""
    r = sharded["2x4"]
    assert r["odd3_nocfg_shape"][0] == 3
    assert r["odd3_nocfg_max_abs_diff"] <= 1e-3
    from svd_jax.pipeline.inputs import padded_batch

    assert padded_batch(3, cfg=False, data_size=1) == 3  # data axis of 1: nothing to pad
    assert (padded_batch(3, cfg=False, data_size=2), padded_batch(3, cfg=True, data_size=2)) == (4, 3)
    assert padded_batch(5, cfg=False, data_size=4) == 8


@pytest.mark.slow
def test_lora_on_a_mesh_shards_like_its_base_weights(sharded):
    """An adapter on an FSDP pipeline over 8 devices: every fused kernel keeps its base kernel's sharding, the
    unfused factors are placed like weights (split where they divide), and fused and unfused videos equal the
    one-device pipeline with the same adapter."""
    r = sharded["lora"]
    assert r["fused_changed"] > 10 and r["fused_same_sharding"] and r["base_split"] > 10, r
    assert r["unfused_on_devices"] == 8 and r["unfused_split"] > 0, r
    assert r["fused_max_abs_diff"] <= 1e-3 and r["unfused_max_abs_diff"] <= 1e-3, r


def test_constrained_models_equal_unconstrained(tiny_pipeline, env):
    """On 8 CPU devices (subprocess), the models with the mesh's block-boundary constraints give the same
    outputs as without, for both mesh shapes, and the UNet output really lives on all 8 devices."""
    _, folder = tiny_pipeline
    proc = subprocess.run([sys.executable, str(HERE / "sharded_models_run.py"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in r.items():
        if key.endswith("_devices"):
            assert value == 8, key
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
    n = mesh.size
    assert dict(mesh.shape) == ({"data": 2, "space": n // 2} if n % 2 == 0 else {"data": 1, "space": n})
    with pytest.raises(ValueError, match="must use all"):
        make_mesh(data=n + 1, space=1)
    part = Partitioner(make_mesh(), fsdp=True)
    assert part.param_spec((3, 5 * n))[1] == ("data", "space")  # the divisible dimension is split
    assert Partitioner(make_mesh()).param_spec((4 * n, 4 * n)) == jax.sharding.PartitionSpec()
    spec = jax.sharding.PartitionSpec("data", "space")
    assert Partitioner(make_mesh(data=1, space=n)).fit(spec, (3, 2 * n)) == spec
    if n > 1:  # a dimension the mesh does not divide is left unsplit
        assert Partitioner(make_mesh(data=1, space=n)).fit(spec, (3, n + 1)) == jax.sharding.PartitionSpec("data", None)


@pytest.mark.slow
def test_multihost_two_processes(tiny_pipeline, tmp_path, env):
    """2 processes x 4 CPU devices after jax.distributed.initialize (gloo collectives): every process gets the
    full frames, equal to the one-device run."""
    _, folder = tiny_pipeline
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
