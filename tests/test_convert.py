"""`python -m convert`: diffusers folder -> Flax layout -> from_pretrained gives the same parameters and frames;
the converted folder is checked as strictly as the diffusers one, with clear errors."""

import builtins
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from safetensors.numpy import load_file, save_file

import svd_jax
from svd_jax import StableVideoDiffusionPipeline
from svd_jax.cli import main as cli_main
from svd_jax.convert import convert_checkpoint
from svd_jax.models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from svd_jax.weights import (
    FLAX_FORMAT,
    FLAX_FORMAT_VERSION,
    FLAX_MANIFEST,
    FLAX_WEIGHTS,
    CheckpointError,
    model_key,
    read_safetensors_header,
    tensors_digest,
)
from conftest import TINY_PIPE_VAE, make_vae

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"unet": UNetSpatioTemporalConditionModel, "vae": AutoencoderKLTemporalDecoder,
              "image_encoder": CLIPVisionModelWithProjection}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _assert_same_params(a, b, dtype):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype == dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def converted(tiny_pipeline, tmp_path_factory):
    """{dtype name: the tiny pipeline converted to that dtype}."""
    _, folder = tiny_pipeline
    return {name: convert_checkpoint(folder, tmp_path_factory.mktemp(f"flax_{name}") / "svd", dtype=name,
                                     log=lambda m: None) for name in DTYPES}


@pytest.fixture()
def vae_copy(converted, tmp_path):
    """A writable copy of the converted (fp32) VAE folder."""
    return Path(shutil.copytree(converted["float32"] / "vae", tmp_path / "vae"))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_equals_diffusers_load(tiny_pipeline, converted, dtype):
    """All three components: loading the converted folder gives bit-identical params to loading the diffusers
    folder, in the same dtype (stored as fp32 or bf16, loaded as stored)."""
    _, folder = tiny_pipeline
    for sub, cls in COMPONENTS.items():
        _, want = cls.from_pretrained(folder, sub, DTYPES[dtype])
        _, got = cls.from_pretrained(converted[dtype], sub, DTYPES[dtype])
        _assert_same_params(want, got, DTYPES[dtype])


def test_cast_on_load(tiny_pipeline, converted):
    """A file in one dtype loads in another, cast tensor by tensor, as the diffusers path casts."""
    _, folder = tiny_pipeline
    _, want = UNetSpatioTemporalConditionModel.from_pretrained(folder, "unet", jnp.bfloat16)
    _, got = UNetSpatioTemporalConditionModel.from_pretrained(converted["float32"], "unet", jnp.bfloat16)
    _assert_same_params(want, got, jnp.bfloat16)
    _, up = UNetSpatioTemporalConditionModel.from_pretrained(converted["bfloat16"], "unet", jnp.float32)
    _assert_same_params(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), want), up, jnp.float32)


def test_layout_manifest_and_copies(tiny_pipeline, converted):
    """Keys are Flax paths, tensors already transposed (conv OIHW->HWIO, Conv3d OIDHW->DHWIO, Linear, norm);
    one manifest per component; the other components' configs and model_index.json are copied as they are."""
    ref, folder = tiny_pipeline
    out = converted["float32"]
    unet = load_file(out / "unet" / FLAX_WEIGHTS)
    vae = load_file(out / "vae" / FLAX_WEIGHTS)
    clip = load_file(out / "image_encoder" / FLAX_WEIGHTS)
    usd, vsd, csd = ({k: v.numpy() for k, v in m.state_dict().items()} for m in (ref.unet, ref.vae, ref.image_encoder))
    np.testing.assert_array_equal(unet["conv_in/kernel"], usd["conv_in.weight"].transpose(2, 3, 1, 0))
    conv3d = "down_blocks.0.resnets.0.temporal_res_block.conv1.weight"
    np.testing.assert_array_equal(unet["down_blocks_0/resnets_0/temporal_res_block/conv1/kernel"],
                                  usd[conv3d].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(unet["time_embedding/linear_1/kernel"], usd["time_embedding.linear_1.weight"].T)
    np.testing.assert_array_equal(vae["decoder/time_conv_out/kernel"],
                                  vsd["decoder.time_conv_out.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(clip["vision_model/post_layernorm/scale"], csd["vision_model.post_layernorm.weight"])
    for sub, cls in COMPONENTS.items():
        m = json.loads((out / sub / FLAX_MANIFEST).read_text())
        n = len(jax.tree_util.tree_leaves(cls.from_pretrained(folder, sub)[1]))
        assert (m["format"], m["format_version"], m["converter_version"]) == (FLAX_FORMAT, 1, svd_jax.__version__)
        assert (m["class_name"], m["dtype"], m["variant"], m["num_tensors"]) == (cls.__name__, "float32", None, n)
        assert m["source"] == str(Path(folder).resolve()) and m["source_subfolder"] == sub
        assert len(read_safetensors_header(out / sub / FLAX_WEIGHTS)[0]) == n
        assert (out / sub / "config.json").read_bytes() == (folder / sub / "config.json").read_bytes()
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"):
        assert (out / rel).read_bytes() == (folder / rel).read_bytes(), rel


def test_pipeline_frames_identical(tiny_pipeline, converted):
    _, folder = tiny_pipeline
    img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    kw = dict(height=64, width=48, num_frames=3, num_inference_steps=2, seed=0, output_type="np")
    a = StableVideoDiffusionPipeline.from_pretrained(folder)(img, **kw).frames
    b = StableVideoDiffusionPipeline.from_pretrained(converted["float32"])(img, **kw).frames
    assert a.shape == (1, 3, 64, 48, 3) and np.abs(a).max() > 0
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sharded_load_two_processes(tiny_pipeline, converted, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed), an FSDP mesh over all 8: every device holds only its own
    slice (make_array_from_callback), equal to the one-device diffusers load, as stored (fp32) and cast (bf16);
    each process reads only the rows its devices need (some of its tensors start past row 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "convert_multihost_run.py"),
                               str(tiny_pipeline[1]), str(converted["float32"]), str(port), str(i), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    for i in range(2):
        r = json.loads((tmp_path / f"result_{i}.json").read_text())
        assert (r["devices"], r["local_devices"]) == (8, 4)
        for key in ("unet_float32", "vae_float32", "image_encoder_float32", "unet_bfloat16"):
            assert r[key]["bad"] == [] and r[key]["split"] > 0, (i, key, r[key])
        if i == 1:
            assert r["unet_float32"]["not_from_row0"] > 0


def test_fp16_variant_keeps_dtype_and_cli(tmp_path):
    """--variant fp16 reads the variant files; without --dtype the source's dtype is kept; `python -m convert`
    and `svd-jax convert` are the same command."""
    model = make_vae(TINY_PIPE_VAE, seed=3).half()
    model.save_pretrained(tmp_path / "src", variant="fp16")
    proc = subprocess.run([sys.executable, "-m", "convert", str(tmp_path / "src"), str(tmp_path / "a"), "--variant",
                           "fp16"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "a" / FLAX_MANIFEST).read_text())
    assert (m["variant"], m["dtype"], m["source_dtypes"]) == ("fp16", "float16", ["float16"])
    _, want = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "src", variant="fp16", dtype=jnp.float16)
    _, got = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "a", variant="fp16", dtype=jnp.float16)
    _assert_same_params(want, got, jnp.float16)
    with pytest.raises(CheckpointError, match=r"converted from the 'fp16' weights, not variant 'fp32'"):
        AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "a", variant="fp32")
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "b"), "--variant", "fp16", "--dtype",
                     "float32", "--quiet"]) == 0
    _, got32 = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "b", dtype=jnp.float16)
    _assert_same_params(want, got32, jnp.float16)  # fp16 -> fp32 file -> fp16 is exact
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "b"), "--variant", "fp16"]) == 1  # not empty


def test_hub_repo_id(tiny_pipeline, tmp_path):
    """A hub repo id (offline, from a hub-cache snapshot): the converter fetches what it needs and records the
    repo and commit; a converted repo loads by repo id too."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--svd-test--tiny"
    shutil.copytree(tiny_pipeline[1], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    out = convert_checkpoint("svd-test/tiny", tmp_path / "out", cache_dir=tmp_path / "hub", local_files_only=True,
                             log=lambda m: None)
    m = json.loads((out / "vae" / FLAX_MANIFEST).read_text())
    assert (m["source"], m["source_revision"]) == ("svd-test/tiny", sha)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_pipeline[1].iterdir())
    conv_repo = tmp_path / "hub" / "models--svd-test--tiny-flax"
    shutil.copytree(out, conv_repo / "snapshots" / sha)
    (conv_repo / "refs").mkdir()
    (conv_repo / "refs" / "main").write_text(sha)
    _, want = CLIPVisionModelWithProjection.from_pretrained(tiny_pipeline[1], "image_encoder")
    _, got = CLIPVisionModelWithProjection.from_pretrained("svd-test/tiny-flax", "image_encoder",
                                                           cache_dir=tmp_path / "hub", local_files_only=True)
    _assert_same_params(want, got, jnp.float32)


# ------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ------------------------------------------------------------------------------------------------------------------


def _edit_manifest(folder, **changes):
    path = folder / FLAX_MANIFEST
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_neither_layout(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no config.json, so neither layout: a diffusers/transformers component "
                                              r"folder .* or a converted Flax folder .*found \['weights.npz'\]"):
        AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"neither a pipeline folder \(model_index.json\) nor a component folder"):
        convert_checkpoint(tmp_path / "x", tmp_path / "out")


def test_weights_without_manifest(vae_copy):
    (vae_copy / FLAX_MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"{FLAX_WEIGHTS} without {FLAX_MANIFEST} is an incomplete conversion"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


@pytest.mark.parametrize("changes,msg", [
    (dict(format_version=2), r"format version 2, but this svd-jax reads version 1 .*python -m convert"),
    (dict(format="something-else"), r"format 'something-else', expected 'svd-jax-flax'"),
    (dict(dtype="float16"), r"its manifest says dtype float16, but \d+ tensor\(s\) are not"),
    (dict(dtype="int8"), r"dtype 'int8', expected one of \['float32', 'bfloat16', 'float16'\]"),
    (dict(num_tensors=3), r"\d+ tensors, but its manifest says 3"),
    (dict(class_name="UNetSpatioTemporalConditionModel"),
     r"converted from a UNetSpatioTemporalConditionModel checkpoint, not AutoencoderKLTemporalDecoder"),
])
def test_manifest_mismatch(vae_copy, changes, msg):
    _edit_manifest(vae_copy, **changes)
    with pytest.raises(CheckpointError, match=msg):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_truncated_file(vae_copy):
    path = vae_copy / FLAX_WEIGHTS
    path.write_bytes(path.read_bytes()[:-1000])
    msg = rf"{FLAX_WEIGHTS}: .* ends at byte \d+ but the file has \d+ bytes \(truncated"
    with pytest.raises(CheckpointError, match=msg):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_wrong_component_folder(converted):
    with pytest.raises(CheckpointError, match="converted from a AutoencoderKLTemporalDecoder checkpoint, not "
                                              r"CLIPVisionModelWithProjection \(wrong subfolder\?\)"):
        CLIPVisionModelWithProjection.from_pretrained(converted["float32"], "vae")


def test_missing_unexpected_and_misshapen_tensors(vae_copy):
    """Edited tensors no longer match the manifest's digest, so the file is checked against the model again:
    every problem is named."""
    path = vae_copy / FLAX_WEIGHTS
    t = load_file(path)
    del t["decoder/conv_out/bias"]
    t["decoder/extra/kernel"] = np.zeros((3, 3), np.float32)
    t["encoder/conv_in/kernel"] = t["encoder/conv_in/kernel"][:, :, :2]
    save_file(t, path)
    with pytest.raises(CheckpointError) as e:
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)
    msg = str(e.value)
    assert "1 shape mismatch:\n  encoder/conv_in/kernel: expected shape [3, 3, 3, 32], found [3, 3, 2, 32]" in msg
    assert "1 unexpected tensor (not in the model):\n  decoder/extra/kernel [3, 3]" in msg
    assert "1 missing tensor (model parameter not in the checkpoint):\n  decoder/conv_out/bias [3]" in msg


def test_stale_model_key_checks_again(vae_copy, tiny_pipeline):
    """A manifest from other model code (model_key differs) is not trusted: the file is checked against the model
    by jax.eval_shape, and still loads the same numbers."""
    _edit_manifest(vae_copy, model_key="0" * 64)
    _, want = AutoencoderKLTemporalDecoder.from_pretrained(tiny_pipeline[1], "vae")
    _, got = AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)
    _assert_same_params(want, got, jnp.float32)


def test_converted_folder_takes_the_fast_path(tiny_pipeline, converted, monkeypatch):
    """A freshly converted folder's manifest (model_key + tensors_digest) matches: every component loads without
    building its abstract tree (jax.eval_shape), to the same numbers as the diffusers load."""
    _, folder = tiny_pipeline
    want = {sub: cls.from_pretrained(folder, sub)[1] for sub, cls in COMPONENTS.items()}

    def not_needed(self):
        raise AssertionError(f"{type(self).__name__}.init_params_abstract called: the fast path was not taken")

    for sub, cls in COMPONENTS.items():
        monkeypatch.setattr(cls, "init_params_abstract", not_needed)
        _, got = cls.from_pretrained(converted["float32"], sub)
        _assert_same_params(want[sub], got, jnp.float32)


def test_model_key_is_format_class_and_config_only(converted, monkeypatch):
    """The key is a digest of the format version, the class name and the config (canonical JSON), nothing else:
    no source file is read, so editing the code (a comment) keeps the fast path; the tensors digest the converter
    records is the written file's names, shapes and dtypes."""
    for sub, cls in COMPONENTS.items():
        out = converted["float32"] / sub
        config = json.loads((out / "config.json").read_text())
        blob = json.dumps([FLAX_FORMAT, FLAX_FORMAT_VERSION, cls.__name__, config], sort_keys=True,
                          separators=(",", ":"))
        expected = hashlib.sha256(blob.encode()).hexdigest()
        manifest = json.loads((out / FLAX_MANIFEST).read_text())
        assert manifest["model_key"] == expected
        with monkeypatch.context() as m:  # reads no file
            m.setattr(builtins, "open", lambda *a, **k: pytest.fail("model_key opened a file"))
            m.setattr(Path, "read_bytes", lambda *a, **k: pytest.fail("model_key read a file"))
            assert model_key(cls.__name__, dict(reversed(list(config.items())))) == expected  # key order: no matter
        assert manifest["tensors_digest"] == tensors_digest(read_safetensors_header(out / FLAX_WEIGHTS)[0])
    bf16 = converted["bfloat16"] / "vae"
    assert (json.loads((bf16 / FLAX_MANIFEST).read_text())["tensors_digest"]
            != json.loads((converted["float32"] / "vae" / FLAX_MANIFEST).read_text())["tensors_digest"])  # dtypes
    config = json.loads((converted["float32"] / "vae" / "config.json").read_text())
    key = model_key("AutoencoderKLTemporalDecoder", config)
    assert model_key("CLIPVisionModelWithProjection", config) != key
    assert model_key("AutoencoderKLTemporalDecoder", {**config, "latent_channels": 8}) != key
    monkeypatch.setattr("svd_jax.weights.flax_layout.FLAX_FORMAT_VERSION", FLAX_FORMAT_VERSION + 1)
    assert model_key("AutoencoderKLTemporalDecoder", config) != key


def test_edited_config_is_checked(vae_copy):
    """The config is part of the model key: a config.json edited after conversion is checked against the file
    (whose tensors are untouched) and the mismatch reported."""
    cfg = json.loads((vae_copy / "config.json").read_text())
    cfg["latent_channels"] = 8
    (vae_copy / "config.json").write_text(json.dumps(cfg))
    msg = r"decoder/conv_in/kernel: expected shape \[3, 3, 8, 64\], found \[3, 3, 4, 64\]"
    with pytest.raises(CheckpointError, match=msg):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_converter_refusals(tiny_pipeline, converted, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"busy exists and is not empty; choose a new folder or pass --overwrite"):
        convert_checkpoint(tiny_pipeline[1], tmp_path / "busy")
    with pytest.raises(CheckpointError, match=rf"svd/\w+ is already converted \(it has {FLAX_MANIFEST}\)"):
        convert_checkpoint(converted["float32"], tmp_path / "again")
    with pytest.raises(CheckpointError, match=r"no such folder"):
        convert_checkpoint(tmp_path / "nope" / "deeper", tmp_path / "out")
