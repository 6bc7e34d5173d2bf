"""svd_jax.training.export: a fine-tuned UNet exported as a diffusers pipeline folder that diffusers and svd-jax
load (equal outputs, bit-identical params), the other components copied byte for byte, atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from flax import traverse_util

from svd_jax.models import UNetSpatioTemporalConditionModel
from svd_jax.training import export as export_mod
from svd_jax.training.export import export_pipeline, export_unet
from svd_jax.weights import CheckpointError, params_to_torch_state, read_safetensors_header
from conftest import rel_err

TOL = 1e-4


def _files(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``folder`` (links followed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _flat(params) -> dict:
    return traverse_util.flatten_dict(params)


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg="/".join(k))


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def trained(tiny_pipeline):
    """(module, base params, "trained" params: every leaf moved by a seeded perturbation)."""
    _, folder = tiny_pipeline
    module, params = UNetSpatioTemporalConditionModel.from_pretrained(folder, subfolder="unet")
    rng = np.random.default_rng(7)
    flat = _flat(params)
    new = {k: v + jnp.asarray(0.05 * (float(np.std(v)) or 1.0) * rng.standard_normal(v.shape), v.dtype)
           for k, v in flat.items()}
    return module, params, traverse_util.unflatten_dict(new)


@pytest.fixture(scope="module")
def exported(tiny_pipeline, trained, tmp_path_factory):
    """An export of the trained params into a folder that already holds a run's other files."""
    _, folder = tiny_pipeline
    module, _, new = trained
    out = tmp_path_factory.mktemp("export") / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "x").write_text("step 100")
    (out / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    assert export_pipeline(folder, module, new, out) == out
    return out


def _unet_inputs(seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, 3, 8, 12, 8)).astype(np.float32)
    ehs = rng.normal(size=(1, 1, 32)).astype(np.float32)
    ids = np.array([[6, 127, 0.02]], np.float32)
    return x, np.float32(0.7), ehs, ids


def _torch_out(model, x, t, ehs, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 1, 4, 2, 3).contiguous(), torch.as_tensor(t),
                    torch.from_numpy(ehs), torch.from_numpy(ids)).sample
    return out.float().permute(0, 1, 3, 4, 2).numpy()


def test_exported_unet_runs_as_trained_in_diffusers_and_reloads_bit_identical(tiny_pipeline, trained, exported):
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    pipe, _ = tiny_pipeline
    module, _, new = trained
    x, t, ehs, ids = _unet_inputs()
    ours = np.asarray(jax.jit(lambda p, *a: module.apply({"params": p}, *a).sample)(new, x, t, ehs, ids))
    theirs = _torch_out(TorchUNet.from_pretrained(exported, subfolder="unet").float().eval(), x, t, ehs, ids)
    assert rel_err(theirs, ours) <= TOL
    assert rel_err(_torch_out(pipe.unet, x, t, ehs, ids), ours) > 1e-2  # the base UNet gives another output
    module2, params2 = UNetSpatioTemporalConditionModel.from_pretrained(exported, subfolder="unet")
    _assert_same_params(params2, new)
    assert module2 == module


def test_other_components_copied_and_run_files_kept(tiny_pipeline, trained, exported):
    from diffusers import StableVideoDiffusionPipeline as RefPipeline

    _, folder = tiny_pipeline
    _, _, new = trained
    for c in ("vae", "image_encoder", "scheduler", "feature_extractor"):
        assert _files(exported / c) == _files(folder / c), c
    assert (exported / "model_index.json").read_bytes() == (folder / "model_index.json").read_bytes()
    assert sorted(p.name for p in (exported / "unet").iterdir()) == ["config.json",
                                                                      "diffusion_pytorch_model.safetensors"]
    assert json.loads((exported / "unet" / "config.json").read_text()) == json.loads(
        (folder / "unet" / "config.json").read_text())
    assert (exported / "checkpoints" / "x").read_text() == "step 100"
    assert (exported / "metrics.jsonl").read_text() == '{"loss": 1.0}\n'
    assert _hidden(exported) == []  # no temporary folder left
    ref = RefPipeline.from_pretrained(exported)  # diffusers loads the whole pipeline
    state = {k: v.numpy() for k, v in ref.unet.state_dict().items()}
    want = params_to_torch_state(new)
    assert state.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(state[k], want[k], err_msg=k)


def test_reexport_replaces_unet_only(tiny_pipeline, trained, tmp_path):
    _, folder = tiny_pipeline
    module, base, new = trained
    out = tmp_path / "out"
    export_pipeline(folder, module, new, out)
    (out / "unet" / "stale.txt").write_text("from the first export")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "x").write_text("keep")
    vae_before = _files(out / "vae")
    export_pipeline(folder, module, base, out)
    _, params = UNetSpatioTemporalConditionModel.from_pretrained(out, subfolder="unet")
    _assert_same_params(params, base)
    assert not (out / "unet" / "stale.txt").exists()  # the whole unet/ was replaced
    assert _files(out / "vae") == vae_before
    assert (out / "checkpoints" / "x").read_text() == "keep"
    assert _hidden(out) == []


def test_cli_generate_runs_on_the_export(exported, tmp_path):
    from svd_jax.cli import main

    img = tmp_path / "in.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    video = tmp_path / "out.gif"
    assert main(["generate", "--model", str(exported), "--image", str(img), "--output", str(video), "--height", "64",
                 "--width", "64", "--num-frames", "2", "--steps", "1", "--max-guidance", "1", "--quiet"]) == 0
    assert video.is_file() and video.stat().st_size > 0
    with PIL.Image.open(video) as g:
        assert g.n_frames == 2 and g.size == (64, 64)


@pytest.mark.parametrize("dtype,st_name,np_dtype", [("float16", "F16", np.float16),
                                                     (jnp.bfloat16, "BF16", jnp.bfloat16), (None, "F32", np.float32)])
def test_export_unet_dtype_and_own_config(trained, tmp_path, dtype, st_name, np_dtype):
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    from svd_jax.weights.safetensors_io import _ST_DTYPES

    module, _, new = trained
    folder = export_unet(module, new, tmp_path / "unet", dtype=dtype)
    infos, meta = read_safetensors_header(folder / "diffusion_pytorch_model.safetensors")
    assert meta == {"format": "pt"}
    assert len(infos) == len(_flat(new))
    assert {i.dtype for i in infos.values()} == {np.dtype(_ST_DTYPES[st_name])}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == "UNetSpatioTemporalConditionModel" and cfg["num_frames"] == 3
    assert "forward_chunk_size" not in cfg and "dtype" not in cfg
    _, params = UNetSpatioTemporalConditionModel.from_pretrained(folder, dtype=np_dtype)
    _assert_same_params(params, jax.tree_util.tree_map(lambda v: v.astype(np_dtype), new))
    TorchUNet.from_pretrained(folder)  # diffusers builds the same architecture from the rebuilt config


def _drop(params, path):
    flat = _flat(params)
    del flat[path]
    return traverse_util.unflatten_dict(flat)


def _reshape(params, path):
    flat = dict(_flat(params))
    flat[path] = flat[path][..., :-1]
    return traverse_util.unflatten_dict(flat)


def _extra(params, path):
    flat = dict(_flat(params))
    flat[path[:-1] + ("extra",)] = flat[path]
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("edit,msg", [(_drop, "missing parameter {}"), (_reshape, "parameter {} has shape"),
                                      (_extra, "unexpected parameter {}")])
def test_mismatched_params_are_refused_before_writing(tiny_pipeline, trained, tmp_path, edit, msg):
    _, folder = tiny_pipeline
    module, _, new = trained
    path = ("down_blocks_0", "resnets_0", "temporal_res_block", "conv1", "kernel")  # a Conv3d kernel
    bad = edit(new, path)
    name = "/".join(path[:-1] + ("extra",)) if edit is _extra else "/".join(path)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=msg.format(name)):
        export_pipeline(folder, module, bad, out)
    assert not out.exists()  # nothing created, so no unet/
    out.mkdir()
    with pytest.raises(CheckpointError, match=msg.format(name)):
        export_unet(module, bad, out / "unet")
    assert list(out.iterdir()) == []


def test_failure_while_writing_leaves_the_previous_export(tiny_pipeline, trained, tmp_path, monkeypatch):
    _, folder = tiny_pipeline
    module, base, new = trained
    out = tmp_path / "out"
    export_pipeline(folder, module, new, out)
    before = _files(out)
    real = export_mod.write_safetensors

    def fail(path, specs, arrays, metadata=None):
        real(path, specs[:3], (a for _, a in zip(range(3), arrays)), metadata)  # a partial file, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        export_pipeline(folder, module, base, out)
    assert _files(out) == before and _hidden(out) == []
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        export_pipeline(folder, module, base, fresh)
    assert not fresh.exists()


def test_bad_base_or_output_refused(tiny_pipeline, trained, tmp_path):
    _, folder = tiny_pipeline
    module, _, new = trained
    before = _files(folder)
    with pytest.raises(CheckpointError, match="no model_index.json"):
        export_pipeline(folder / "unet", module, new, tmp_path / "a")  # a component folder, not a pipeline
    with pytest.raises(CheckpointError, match="no such folder"):
        export_pipeline(tmp_path / "missing", module, new, tmp_path / "b")
    with pytest.raises(CheckpointError, match="overwrite the base"):
        export_pipeline(folder, module, new, folder)
    with pytest.raises(CheckpointError, match="overwrite the base"):
        export_pipeline(folder, module, new, folder / "unet" / "..")
    with pytest.raises(CheckpointError, match="inside the base model's vae/"):
        export_pipeline(folder, module, new, folder / "vae" / "export")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        export_pipeline(folder, module, new, tmp_path / "c", dtype="int8")
    assert not any((tmp_path / n).exists() for n in "abc")
    assert _files(folder) == before


def test_unet_variants_not_copied_and_variant_export(tiny_pipeline, trained, tmp_path):
    """A base with fp16 variants in its model folders: the export's unet/ has only the new weights (no stale
    fp16 file); the other folders keep theirs; variant="fp16" links the new UNet under that name too."""
    _, folder = tiny_pipeline
    module, _, new = trained
    base = tmp_path / "base"
    shutil.copytree(folder, base)
    for c in ("unet", "vae"):  # stand-ins for fp16 weights: the fp32 files under the variant name
        shutil.copyfile(base / c / "diffusion_pytorch_model.safetensors",
                        base / c / "diffusion_pytorch_model.fp16.safetensors")
    out = export_pipeline(base, module, new, tmp_path / "out")
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (out / "unet" / "config.json").read_bytes() == (base / "unet" / "config.json").read_bytes()
    assert _files(out / "vae") == _files(base / "vae")
    assert (out / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    out16 = export_pipeline(base, module, new, tmp_path / "out16", variant="fp16")
    _, p16 = UNetSpatioTemporalConditionModel.from_pretrained(out16, subfolder="unet", variant="fp16")
    _assert_same_params(p16, new)


def test_hub_snapshot_base_copies_file_contents(tiny_pipeline, trained, tmp_path):
    """A repo id resolved offline from a hub cache whose snapshot files are links into blobs/: the export holds
    regular files with the blobs' contents."""
    _, folder = tiny_pipeline
    module, _, new = trained
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--svd-test--tiny-export"
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    for i, f in enumerate(p for p in sorted(folder.rglob("*")) if p.is_file()):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(f, blob)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    out = export_pipeline("svd-test/tiny-export", module, new, tmp_path / "out", cache_dir=tmp_path / "hub",
                          local_files_only=True)
    for c in ("vae", "image_encoder", "scheduler", "feature_extractor"):
        assert _files(out / c) == _files(folder / c)
        assert not any(p.is_symlink() for p in (out / c).rglob("*"))
    _, params = UNetSpatioTemporalConditionModel.from_pretrained(out, subfolder="unet")
    _assert_same_params(params, new)
