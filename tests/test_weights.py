"""The converter: file formats (single, sharded, fp16 variant, hub snapshot), strictness and clear errors."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import svd_jax.weights.torch_layout as torch_layout
from svd_jax.models import AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, UNetSpatioTemporalConditionModel
from svd_jax.weights import (
    TRANSFORMS,
    CheckpointError,
    Transform,
    flatten_shapes,
    load_params,
    params_to_torch_state,
    plan_conversion,
    read_safetensors,
    resolve_checkpoint,
)
from conftest import CLIP_CONFIGS, TINY_PIPE_UNET, VAE_CONFIGS, make_vae, nchw, nhwc, rel_err

VAE_FILE = "diffusion_pytorch_model.safetensors"


def _params_equal(a, b):
    fa, fb = flatten_shapes(a), flatten_shapes(b)
    assert fa == fb
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture()
def vae_copy(tiny_vaes, tmp_path):
    _, folder = tiny_vaes["lpb3"]
    dst = tmp_path / "vae"
    shutil.copytree(folder, dst)
    return dst


def _rewrite(folder, fn):
    path = folder / VAE_FILE
    tensors = dict(load_file(path))
    fn(tensors)
    save_file(tensors, path)


def test_every_tensor_lands_transposed_right(tiny_vaes):
    """Spot-check the layout rules on real tensors: conv OIHW->HWIO, Conv3d OIDHW->DHWIO, Linear, norm->scale."""
    model, folder = tiny_vaes["svd_like"]
    _, params = AutoencoderKLTemporalDecoder.from_pretrained(folder)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    dec = params["decoder"]
    np.testing.assert_array_equal(dec["conv_in"]["kernel"], sd["decoder.conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(dec["time_conv_out"]["kernel"],
                                  sd["decoder.time_conv_out.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(dec["mid_block"]["attentions_0"]["to_q"]["kernel"],
                                  sd["decoder.mid_block.attentions.0.to_q.weight"].T)
    np.testing.assert_array_equal(dec["up_blocks_1"]["resnets_2"]["temporal_res_block"]["norm2"]["scale"],
                                  sd["decoder.up_blocks.1.resnets.2.temporal_res_block.norm2.weight"])
    np.testing.assert_array_equal(dec["up_blocks_1"]["resnets_2"]["time_mixer"]["mix_factor"],
                                  sd["decoder.up_blocks.1.resnets.2.time_mixer.mix_factor"])


def test_sharded_checkpoint(tiny_vaes, tmp_path):
    model, folder = tiny_vaes["lpb3"]
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / f"{VAE_FILE}.index.json").exists() and not (tmp_path / VAE_FILE).exists()
    _, a = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path)
    _, b = AutoencoderKLTemporalDecoder.from_pretrained(folder)
    _params_equal(a, b)


def test_fp16_variant_and_dtype_cast(tmp_path):
    model = make_vae(VAE_CONFIGS["attn_lpb1"], seed=7).half()
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    with pytest.raises(CheckpointError, match="no safetensors weights.*found.*fp16"):
        AutoencoderKLTemporalDecoder.from_pretrained(tmp_path)  # only the variant exists
    module, p32 = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path, variant="fp16", dtype=jnp.float32)
    leaves = jax.tree_util.tree_leaves(p32)
    assert all(x.dtype == jnp.float32 for x in leaves)
    w = model.state_dict()["encoder.conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(p32["encoder"]["conv_in"]["kernel"], w)  # fp16 -> fp32 is exact
    m16, p16 = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path, variant="fp16", dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))
    z = jnp.ones((2, 2, 3, 3), jnp.bfloat16)
    assert m16.apply({"params": p16}, z, num_frames=2, method="decode").dtype == jnp.bfloat16


def test_variant_asked_but_absent(tiny_vaes):
    _, folder = tiny_vaes["lpb3"]
    with pytest.raises(CheckpointError, match=r"no variant 'fp16' safetensors weights.*variant=None"):
        AutoencoderKLTemporalDecoder.from_pretrained(folder, variant="fp16")


def test_hub_repo_id_offline_snapshot(tiny_vaes, tiny_clips, tmp_path):
    """A repo id resolves through huggingface_hub's cache layout (snapshot folder), offline."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--svd-test--tiny-svd"
    snap = repo / "snapshots" / sha
    shutil.copytree(tiny_vaes["lpb3"][1], snap / "vae")
    shutil.copytree(tiny_clips["gelu"][1], snap / "image_encoder")
    (snap / "unet").mkdir()
    (snap / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not needed, never read")
    (snap / "scheduler").mkdir()
    (snap / "scheduler" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    files = resolve_checkpoint("svd-test/tiny-svd", "vae", cache_dir=tmp_path, local_files_only=True)
    assert files.weights == (snap / "vae" / VAE_FILE,)
    _, a = AutoencoderKLTemporalDecoder.from_pretrained("svd-test/tiny-svd", subfolder="vae", cache_dir=tmp_path,
                                                        local_files_only=True)
    _, b = AutoencoderKLTemporalDecoder.from_pretrained(tiny_vaes["lpb3"][1])
    _params_equal(a, b)
    m, _ = CLIPVisionModelWithProjection.from_pretrained("svd-test/tiny-svd", subfolder="image_encoder",
                                                         cache_dir=tmp_path, local_files_only=True)
    assert m.hidden_size == 32
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        resolve_checkpoint("svd-test/tiny-svd", "scheduler", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(CheckpointError, match="no config.json"):
        AutoencoderKLTemporalDecoder.from_pretrained("svd-test/tiny-svd", subfolder="unet", cache_dir=tmp_path,
                                                     local_files_only=True)


def test_legacy_attention_names(tiny_vaes, vae_copy):
    """Old checkpoints name the deprecated VAE attention query/key/value/proj_attn; they load the same."""
    model, _ = tiny_vaes["lpb3"]
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(t):
        for k in list(t):
            if "encoder.mid_block.attentions.0." in k and not k.startswith("decoder"):
                for a, b in new.items():
                    if f".{a}." in k:
                        t[k.replace(f".{a}.", f".{b}.")] = t.pop(k)
    _rewrite(vae_copy, rename)
    assert any("proj_attn" in k for k in read_safetensors(vae_copy / VAE_FILE))
    module, params = AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.encode(nchw(x)).latent_dist.mean
    assert rel_err(module.apply({"params": params}, jnp.asarray(x), method="encode").mean, nhwc(ref)) <= 1e-4


def test_missing_tensor(vae_copy):
    _rewrite(vae_copy, lambda t: t.pop("decoder.up_blocks.0.resnets.1.temporal_res_block.conv2.bias"))
    with pytest.raises(CheckpointError,
                       match=r"1 missing tensor.*\n.*decoder/up_blocks_0/resnets_1/temporal_res_block/conv2/bias"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_unexpected_tensor(vae_copy):
    _rewrite(vae_copy, lambda t: t.update({"decoder.post_quant_conv.weight": np.zeros((4, 4, 1, 1), np.float32)}))
    with pytest.raises(CheckpointError,
                       match=r"1 unexpected tensor.*\n\s+decoder.post_quant_conv.weight \[4, 4, 1, 1\]"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_wrong_shape(vae_copy):
    key = "encoder.down_blocks.1.resnets.0.conv1.weight"

    def shrink(t):
        t[key] = t[key][:, :16].copy()
    _rewrite(vae_copy, shrink)
    with pytest.raises(CheckpointError,
                       match=rf"shape mismatch.*\n\s+{key}: expected shape \[64, 32, 3, 3\], found \[64, 16, 3, 3\]"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_missing_config(vae_copy):
    (vae_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_wrong_component_config(vae_copy):
    cfg = json.loads((vae_copy / "config.json").read_text())
    cfg["_class_name"] = "UNetSpatioTemporalConditionModel"
    (vae_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError,
                       match="is for UNetSpatioTemporalConditionModel, not AutoencoderKLTemporalDecoder"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_unsupported_config_value(vae_copy):
    cfg = json.loads((vae_copy / "config.json").read_text())
    cfg["down_block_types"] = ["DownEncoderBlock2D", "SkipDownBlock2D"]
    (vae_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"\['SkipDownBlock2D'\] not supported"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_truncated_file(vae_copy):
    path = vae_copy / VAE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


@pytest.mark.parametrize("garbage", [b"", b"\x05\x00", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
                                     b"PK\x03\x04" * 50])
def test_corrupt_file(vae_copy, garbage):
    (vae_copy / VAE_FILE).write_bytes(garbage)
    with pytest.raises(CheckpointError, match=VAE_FILE):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_no_weights_at_all(vae_copy):
    (vae_copy / VAE_FILE).unlink()
    (vae_copy / "diffusion_pytorch_model.bin").write_bytes(b"pickle")  # never loaded through pickle
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*diffusion_pytorch_model.bin"):
        AutoencoderKLTemporalDecoder.from_pretrained(vae_copy)


def test_missing_folder_and_subfolder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        AutoencoderKLTemporalDecoder.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no subfolder 'vae'"):
        AutoencoderKLTemporalDecoder.from_pretrained(tmp_path, subfolder="vae")


def test_plan_reports_all_problems_at_once():
    target = {("a", "kernel"): (3, 2), ("a", "bias"): (2,), ("n", "scale"): (2,)}
    ckpt = {"a.weight": (2, 3), "a.bias": (5,), "x.weight": (1,)}
    with pytest.raises(CheckpointError) as e:
        plan_conversion(target, ckpt)
    msg = str(e.value)
    assert "a.bias: expected shape [2], found [5]" in msg
    assert "x.weight [1]" in msg and "n/scale [2]" in msg
    plan = plan_conversion(target, {"a.weight": (2, 3), "a.bias": (2,), "n.weight": (2,)})
    assert {k: v[0] for k, v in plan.entries.items()} == {"a.weight": ("a", "kernel"), "a.bias": ("a", "bias"),
                                                          "n.weight": ("n", "scale")}


# A PyTorch-layout example shape for every layout rule (a rule added to TRANSFORMS needs one here).
TRANSFORM_EXAMPLES = {
    "as is": [(), (7,), (2, 3), (4, 3, 2, 1)],
    "Linear (out,in)->(in,out)": [(3, 5)],
    "Conv2d OIHW->HWIO": [(6, 5, 3, 2), (4, 3, 1, 1)],
    "Conv3d OIDHW->DHWIO": [(6, 5, 3, 2, 4)],
    "1x1 Conv2d (O,I,1,1)->(I,O)": [(6, 5, 1, 1)],
}


def test_every_transform_has_its_inverse():
    """Each layout rule carries its inverse: back(forward(a)) == a and forward(back(b)) == b, on arrays and on
    shapes, and the shape functions agree with the array functions."""
    module_transforms = [v for v in vars(torch_layout).values() if isinstance(v, Transform)]
    assert set(map(id, module_transforms)) == set(map(id, TRANSFORMS))  # the registry lists every rule
    rng = np.random.default_rng(0)
    for t in TRANSFORMS:
        for shape in TRANSFORM_EXAMPLES[t.name]:
            a = rng.standard_normal(shape).astype(np.float32)
            b = t.fn(a)
            assert t.shape_fn(shape) == b.shape, t.name
            assert t.inverse_shape(b.shape) == shape, t.name
            np.testing.assert_array_equal(t.inverse(b), a, err_msg=t.name)
            assert t.inverse(b).shape == shape, t.name
            c = rng.standard_normal(b.shape).astype(np.float32)  # any Flax-layout array goes back and forth too
            np.testing.assert_array_equal(t.fn(t.inverse(c)), c, err_msg=t.name)
            assert t.shape_fn(t.inverse_shape(b.shape)) == b.shape, t.name


def _torch_meta_state(kind, cfg):
    # {name: shape} of the PyTorch reference model (meta device: no weights).
    if kind == "clip":
        from transformers import CLIPVisionConfig
        from transformers import CLIPVisionModelWithProjection as Torch

        make = lambda: Torch(CLIPVisionConfig(**cfg))
    else:
        from diffusers import AutoencoderKLTemporalDecoder as TorchVAE
        from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

        make = lambda: (TorchVAE if kind == "vae" else TorchUNet)(**cfg)
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in make().state_dict().items()}


@pytest.mark.parametrize("kind,cls,cfg", [
    ("vae", AutoencoderKLTemporalDecoder, VAE_CONFIGS["svd_like"]),
    ("clip", CLIPVisionModelWithProjection, CLIP_CONFIGS["gelu"]),
    ("unet", UNetSpatioTemporalConditionModel, TINY_PIPE_UNET),
])
def test_torch_state_round_trip(kind, cls, cfg):
    """Random params of a real module tree -> params_to_torch_state (the inverse rules) -> the reference model's
    PyTorch names and shapes exactly -> plan_conversion / load_params -> the same tree, bit for bit."""
    module = cls.from_config(dict(cfg))
    abstract = module.init_params_abstract()
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    state = params_to_torch_state(params)
    ref = {k: v for k, v in _torch_meta_state(kind, cfg).items()
           if not any(re.fullmatch(p, k) for p in cls._ignore_keys)}
    assert {k: v.shape for k, v in state.items()} == ref
    plan = plan_conversion(flatten_shapes(abstract), {k: v.shape for k, v in state.items()})
    assert len(plan.entries) == len(state) == len(flatten_shapes(abstract))
    back = load_params(abstract, state, jnp.float32, to_device=False)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree_util.tree_leaves(params)):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
