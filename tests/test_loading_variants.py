"""Sharded checkpoints of a variant (``save_pretrained(max_shard_size=..., variant="fp16")``), as diffusers and
transformers write them, through every loader path: the models' ``from_pretrained``, the converter and the
pipeline from a hub repo (its download patterns)."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.convert import convert_checkpoint
from svd_jax.models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection
from svd_jax.weights import CheckpointError, resolve_checkpoint
from svd_jax.weights.locate import pipeline_allow_patterns

# What diffusers / transformers write for save_pretrained(max_shard_size=..., variant="fp16").
CASES = {
    "diffusers": ("diffusion_pytorch_model", "tiny_vaes", "lpb3", AutoencoderKLTemporalDecoder),
    "transformers": ("model", "tiny_clips", "gelu", CLIPVisionModelWithProjection),
}


def _same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_sharded_variant(model, folder: Path, prefix: str) -> list[str]:
    model.save_pretrained(folder, max_shard_size="50KB", variant="fp16", safe_serialization=True)
    shards = sorted(p.name for p in folder.glob(f"{prefix}.fp16-*-of-*.safetensors"))
    assert (folder / f"{prefix}.safetensors.index.fp16.json").is_file() and len(shards) > 1, \
        sorted(p.name for p in folder.iterdir())
    return shards


@pytest.mark.parametrize("library", list(CASES))
def test_sharded_variant_loads_like_unsharded(library, request, tmp_path):
    prefix, fixture, name, cls = CASES[library]
    model, folder = request.getfixturevalue(fixture)[name]
    shards = _save_sharded_variant(model, tmp_path, prefix)
    files = resolve_checkpoint(tmp_path, weights_names=cls._weights_names, variant="fp16")
    assert [p.name for p in files.weights] == shards
    _, got = cls.from_pretrained(tmp_path, variant="fp16")
    _, want = cls.from_pretrained(folder)
    _same_params(got, want)
    with pytest.raises(CheckpointError, match="no safetensors weights"):  # only the variant is there
        cls.from_pretrained(tmp_path)


@pytest.mark.filterwarnings("ignore:This serialization format is now deprecated:FutureWarning")  # diffusers'
def test_legacy_sharded_variant_names(tiny_vaes, tmp_path):
    """The names older diffusers wrote (index ``*.safetensors.fp16.index.json``, shards
    ``*-00001-of-00002.fp16.safetensors``), which diffusers still loads: loaded the same."""
    model, folder = tiny_vaes["lpb3"]
    prefix = "diffusion_pytorch_model"
    _save_sharded_variant(model, tmp_path, prefix)
    index_path = tmp_path / f"{prefix}.safetensors.index.fp16.json"
    index = json.loads(index_path.read_text())
    rename = {s: s.replace(f"{prefix}.fp16-", f"{prefix}-").replace(".safetensors", ".fp16.safetensors")
              for s in set(index["weight_map"].values())}
    for old, new in rename.items():
        (tmp_path / old).rename(tmp_path / new)
    index["weight_map"] = {k: rename[v] for k, v in index["weight_map"].items()}
    index_path.unlink()
    (tmp_path / f"{prefix}.safetensors.fp16.index.json").write_text(json.dumps(index))

    from diffusers import AutoencoderKLTemporalDecoder as TorchVAE

    ref = TorchVAE.from_pretrained(tmp_path, variant="fp16")  # diffusers reads these names
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ref.state_dict()[k], v, rtol=0, atol=0)
    _, got = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path, variant="fp16")
    _, want = AutoencoderKLTemporalDecoder.from_pretrained(folder)
    _same_params(got, want)


@pytest.fixture(scope="module")
def remote_repo(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline as a hub repo would hold it: the default weights and the sharded fp16 variant."""
    ref, _ = tiny_pipeline
    root = tmp_path_factory.mktemp("remote") / "repo"
    ref.save_pretrained(root)
    ref.save_pretrained(root, variant="fp16", max_shard_size="50KB", safe_serialization=True)
    return root


def _repo_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_allow_patterns_match_what_diffusers_writes(remote_repo):
    """snapshot_download's filter (fnmatch over the repo's file names) with the pipeline's patterns keeps every file
    of the asked weights (the variant's shards and index included) and no weights of the other."""
    files = _repo_files(remote_repo)
    for comp, prefix in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                         ("image_encoder", "model")):
        assert f"{comp}/{prefix}.safetensors.index.fp16.json" in files, files
        assert f"{comp}/{prefix}.safetensors" in files, files
    weights = lambda names: {f for f in names if ".safetensors" in f}
    variant_weights = {f for f in weights(files) if ".fp16" in f}
    got = set(filter_repo_objects(files, allow_patterns=pipeline_allow_patterns("fp16")))
    assert weights(got) == variant_weights
    assert {"model_index.json", "unet/config.json", "vae/config.json", "image_encoder/config.json",
            "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"} <= got
    got = set(filter_repo_objects(files, allow_patterns=pipeline_allow_patterns(None)))
    assert weights(files) - variant_weights <= weights(got)
    # the legacy variant names (see test_legacy_sharded_variant_names) are fetched too
    legacy = ["vae/diffusion_pytorch_model.safetensors.fp16.index.json",
              "vae/diffusion_pytorch_model-00001-of-00002.fp16.safetensors"]
    assert list(filter_repo_objects(legacy, allow_patterns=pipeline_allow_patterns("fp16"))) == legacy


def test_pipeline_from_hub_repo_with_sharded_variant(remote_repo, tiny_pipeline, tmp_path, monkeypatch):
    """from_pretrained(repo_id, variant="fp16") downloads through snapshot_download's own filter (stood in for
    by a local copy of the files it would fetch) and loads the sharded variant: the same parameters."""
    fetched = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        snap = tmp_path / "snapshots" / repo_id.replace("/", "--") / str(len(fetched))
        fetched[repo_id] = names = list(filter_repo_objects(_repo_files(remote_repo), allow_patterns=allow_patterns))
        for n in names:
            (snap / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(remote_repo / n, snap / n)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    hub = StableVideoDiffusionPipeline.from_pretrained("svd-test/tiny-fp16", variant="fp16", dtype="float32")
    assert any(".fp16-" in n for n in fetched["svd-test/tiny-fp16"])
    local = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline[1], dtype="float32")
    for name in ("unet", "vae", "image_encoder"):
        _same_params(hub.params[name], local.params[name])


def test_converter_reads_sharded_variant(remote_repo, tiny_pipeline, tmp_path):
    """python -m convert --variant fp16 on a pipeline with sharded variant weights: every model component is
    converted from its fp16 shards, and the converted pipeline has the same parameters."""
    dst = convert_checkpoint(remote_repo, tmp_path / "flax", variant="fp16", log=lambda m: None)
    for comp in ("unet", "vae", "image_encoder"):
        manifest = json.loads((dst / comp / "flax_manifest.json").read_text())
        shards = sorted(p.name for p in (remote_repo / comp).glob("*.fp16-*-of-*.safetensors"))
        assert manifest["source_files"] == shards and len(shards) > 1 and manifest["variant"] == "fp16"
    got = StableVideoDiffusionPipeline.from_pretrained(dst, variant="fp16", dtype="float32")
    want = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline[1], dtype="float32")
    for name in ("unet", "vae", "image_encoder"):
        _same_params(got.params[name], want.params[name])
