"""Stability's single-file checkpoints (svd_jax/weights/sgm.py, ``from_single_file``): the full-size SVD-XT key list
(tests/data/sgm_svd_xt_keys.txt, read from Stability's own modules) maps onto the Flax trees with equal shapes and
nothing left over; tiny perturbed diffusers models written in the sgm layout load back with equal outputs; bad
files are refused naming the tensor."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from test_unet import TINY, _inputs

from svd_jax.configs import SVD_VAE
from svd_jax.models import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from svd_jax.weights import CheckpointError, params_to_torch_state
from svd_jax.weights.sgm import IGNORED, unet_sgm_name, vae_sgm_name
from svd_jax.weights.torch_layout import flatten_shapes, path_to_torch_name
from conftest import TINY_PIPE_VAE, make_unet_pair, make_vae, nchw, nhwc, rel_err

KEYS = __import__("pathlib").Path(__file__).parent / "data" / "sgm_svd_xt_keys.txt"
TOL = 1e-4


def _keys():
    out = {}
    for line in KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        out[name] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


def _needed(module):
    """{diffusers name: PyTorch-layout shape} of a module's parameters (abstract)."""
    from svd_jax.weights.pretrained import _torch_shape

    out = {}
    for path, shape in flatten_shapes(module.init_params_abstract()).items():
        name, fn = path_to_torch_name(path, len(shape))
        out[name] = _torch_shape(fn, shape)
    return out


def test_full_size_key_list_maps_onto_the_flax_trees():
    keys = _keys()
    unet = UNetSpatioTemporalConditionModel.from_config({})
    vae = AutoencoderKLTemporalDecoder.from_config(SVD_VAE)
    consumed = set()
    for module, rename, n in ((unet, unet_sgm_name, 1428), (vae, vae_sgm_name, 374)):
        needed = _needed(module)
        assert len(needed) == n
        for name, shape in needed.items():
            sgm = rename(name, module)
            assert sgm in keys, (name, sgm)
            file_shape = keys[sgm]
            if len(file_shape) == 4 and file_shape[2:] == (1, 1) and len(shape) == 2:  # VAE attention: 1x1 conv
                file_shape = file_shape[:2]
            assert file_shape == shape, (sgm, file_shape, shape)
            consumed.add(sgm)
    assert sum(int(np.prod(keys[k])) for k in consumed if k.startswith("model.")) == 1_524_623_082
    left = sorted(set(keys) - consumed)
    assert left and all(k.startswith(IGNORED) for k in left), left[:5]  # only first_stage_model.encoder: by name


def _write_sgm(path, groups, extra=None):
    """groups: [(torch state dict, rename)] -> one safetensors file in the sgm names (1x1 conv VAE attention)."""
    out = {}
    for state, rename in groups:
        for name, v in state.items():
            sgm = rename(name)
            v = np.ascontiguousarray(v, np.float32)
            if sgm.split(".")[-2] in ("q", "k", "v", "proj_out") and ".attn_1." in sgm and sgm.endswith("weight"):
                v = v.reshape(v.shape + (1, 1))
            out[sgm] = v
    out.update(extra or {})
    save_file(out, str(path))
    return path


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    model, module, params = make_unet_pair(TINY, folder, perturb_seed=3)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    extra = {"conditioner.embedders.0.open_clip.model.visual.proj": np.zeros((4, 4), np.float32),
             "first_stage_model.decoder.conv_in.weight": np.zeros((2,), np.float32)}
    path = _write_sgm(folder / "svd_tiny.safetensors", [(state, lambda n: unet_sgm_name(n, module))], extra)
    return model, module, path


def test_unet_from_single_file_equals_diffusers(unet_file, tmp_path):
    model, module, path = unet_file
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items()}
    m2, params = UNetSpatioTemporalConditionModel.from_single_file(path, config=config, dtype=jnp.float32)
    x, ehs, ids = _inputs(4, 2, 3, 6, 8, 1)
    out = m2.apply({"params": params}, jnp.asarray(x), 0.7, jnp.asarray(ehs), jnp.asarray(ids)).sample
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 1, 4, 2, 3), torch.tensor(0.7), torch.from_numpy(ehs),
                    torch.from_numpy(ids)).sample.permute(0, 1, 3, 4, 2).numpy()
    assert rel_err(out, ref) <= TOL
    # a config file path works as well
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    _, p2 = UNetSpatioTemporalConditionModel.from_single_file(path, config=tmp_path / "config.json")
    assert all(np.array_equal(a, b) for a, b in zip(params_to_torch_state(p2).values(),
                                                     params_to_torch_state(params).values()))


def test_vae_from_single_file_equals_diffusers(tmp_path):
    model = make_vae(dict(TINY_PIPE_VAE), seed=4)
    module = AutoencoderKLTemporalDecoder.from_config(dict(TINY_PIPE_VAE))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # the first stage model's own encoder copy and the conditioner's decoder are in real files: ignored by name
    extra = {"first_stage_model.encoder.conv_in.weight": np.ones((3,), np.float32),
             "conditioner.embedders.3.encoder.decoder.conv_in.weight": np.ones((3,), np.float32),
             "conditioner.embedders.3.encoder.post_quant_conv.weight": np.ones((3,), np.float32)}
    path = _write_sgm(tmp_path / "svd.safetensors", [(state, lambda n: vae_sgm_name(n, module))], extra)
    m2, params = AutoencoderKLTemporalDecoder.from_single_file(path, config=dict(TINY_PIPE_VAE))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
    z = np.random.default_rng(2).normal(size=(3, 4, 6, 4)).astype(np.float32)
    with torch.no_grad():
        ref_mean = nhwc(model.encode(nchw(x)).latent_dist.mean)
        ref_dec = nhwc(model.decode(nchw(z), num_frames=3).sample)
    assert rel_err(m2.apply({"params": params}, jnp.asarray(x), method="encode").mean, ref_mean) <= TOL
    assert rel_err(m2.apply({"params": params}, jnp.asarray(z), num_frames=3, method="decode"), ref_dec) <= TOL


def test_bad_single_files_are_refused(unet_file, tmp_path):
    model, module, path = unet_file
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items()}
    load = lambda p, **kw: UNetSpatioTemporalConditionModel.from_single_file(p, config={**config, **kw})
    # a diffusers-layout file
    diffusers_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(diffusers_file))
    with pytest.raises(CheckpointError, match="not a Stability single-file SVD checkpoint .*diffusers names"):
        load(diffusers_file)
    # truncated
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load(tmp_path / "cut.safetensors")
    # a config whose shapes disagree with the tensors
    with pytest.raises(CheckpointError, match="with another shape .*conv_in"):
        load(path, in_channels=12)
    # a file without the VAE
    with pytest.raises(CheckpointError, match="missing .*first_stage_model.decoder"):
        AutoencoderKLTemporalDecoder.from_single_file(path, config=dict(TINY_PIPE_VAE))
    # an unexpected tensor under the UNet's prefix
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    tensors["model.diffusion_model.input_blocks.99.0.weight"] = np.zeros((1,), np.float32)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="1 unexpected under model.diffusion_model.*input_blocks.99"):
        load(tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "nothing.safetensors")
