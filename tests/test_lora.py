"""LoRA adapters (svd_jax/lora.py) against peft on diffusers' UNet: the same output with the adapter, both ways,
in peft's and diffusers' file formats; bad adapters refused before anything is applied."""

import copy
import json

import jax
import numpy as np
import pytest
import torch
from lora_helpers import random_lora
from peft import LoraConfig, inject_adapter_in_model  # the test extra's reference
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import save_file
from test_unet import TINY, _inputs, _torch_unet

from svd_jax.lora import LoRA, LoRAError, apply_lora, load_lora, save_lora
from conftest import make_unet_pair, rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    model, module, params = make_unet_pair(TINY, tmp_path_factory.mktemp("unet"))
    return model, module, params


def _with_peft(model, config, seed=0, name="default"):
    """A copy of ``model`` with a peft adapter whose A and B are both random (peft starts B at zero), small
    enough that the adapted model stays well conditioned (at 0.3 x randn the adapter more than doubles the output
    and torch's own merged and unmerged forwards differ by 5e-4)."""
    m = inject_adapter_in_model(config, copy.deepcopy(model), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(0.06 * torch.randn(p.shape, generator=g))
    return m


def _peft_folder(m, config, folder, name="default"):
    state = {f"base_model.model.{k}": v.numpy() for k, v in get_peft_model_state_dict(m, adapter_name=name).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    cfg = config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, default=str))
    return folder


_FORWARD = {}


def _jax_out(module, params, seed=3):
    x, ehs, ids = _inputs(seed, 2, 3, 8, 12, 1)
    if module not in _FORWARD:  # one compile for every adapter: same shapes
        _FORWARD[module] = jax.jit(lambda p, *a: module.apply({"params": p}, *a).sample)
    return np.asarray(_FORWARD[module](params, x, 0.7, ehs, ids)), (x, ehs, ids)


CONFIG = dict(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
              rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3.0})


def test_peft_folder_equals_peft(unet, tmp_path):
    model, module, params = unet
    config = LoraConfig(**CONFIG)
    m = _with_peft(model, config)
    lora = load_lora(_peft_folder(m, config, tmp_path / "peft"))
    assert {lora.rank(k) for k in lora.weights} == {2, 4}  # rank_pattern honoured
    base, (x, ehs, ids) = _jax_out(module, params)
    out, _ = _jax_out(module, apply_lora(params, lora))
    ref = _torch_unet(m, x, 0.7, ehs, ids)
    assert rel_err(out, ref) <= TOL
    assert rel_err(base, ref) > 100 * TOL  # the adapter matters
    for layer in m.modules():  # scale 0.5: peft's set_scale on every LoRA layer
        if hasattr(layer, "set_scale") and hasattr(layer, "lora_A"):
            layer.set_scale("default", 0.5)
    out_half, _ = _jax_out(module, apply_lora(params, lora, scale=0.5))
    assert rel_err(out_half, _torch_unet(m, x, 0.7, ehs, ids)) <= TOL


def test_diffusers_single_file_and_two_adapters(unet, tmp_path):
    model, module, params = unet
    c1 = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"])
    c2 = LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_out.0", "proj_in"])
    m = _with_peft(model, c1, seed=1, name="one")
    m = inject_adapter_in_model(c2, m, adapter_name="two")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n and ".two." in n:
                p.copy_(0.06 * torch.randn(p.shape, generator=g))
    # adapter one as a diffusers file with the older lora.down/up names and per-module alphas
    st = get_peft_model_state_dict(m, adapter_name="one")
    dif = {}
    for k, v in st.items():
        mod = k.replace(".lora_A.weight", "").replace(".lora_B.weight", "")
        dif["unet." + k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight")] = \
            v.numpy()
        dif[f"unet.{mod}.alpha"] = np.array(8.0, np.float32)
    save_file(dif, str(tmp_path / "pytorch_lora_weights.safetensors"))
    one = load_lora(tmp_path)
    two = load_lora(_peft_folder(m, c2, tmp_path / "two", name="two"))
    for layer in m.modules():
        if hasattr(layer, "set_adapter") and hasattr(layer, "lora_A"):
            layer.set_adapter(["one", "two"])
            layer.set_scale("one", 1.0)
            layer.set_scale("two", 0.5)
    out, (x, ehs, ids) = _jax_out(module, apply_lora(params, [one, two], scale=[1.0, 0.5]))
    assert rel_err(out, _torch_unet(m, x, 0.7, ehs, ids)) <= TOL


def test_save_lora_loads_in_peft(unet, tmp_path):
    model, module, params = unet
    config = LoraConfig(**CONFIG)
    lora = load_lora(_peft_folder(_with_peft(model, config, seed=4), config, tmp_path / "src"))
    folder = save_lora(lora, tmp_path / "out")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = _read(folder / "adapter_model.safetensors")
    fresh = inject_adapter_in_model(LoraConfig(**{k: cfg[k] for k in ("r", "lora_alpha", "target_modules",
                                                                        "rank_pattern", "alpha_pattern",
                                                                        "use_rslora")}), copy.deepcopy(model))
    res = set_peft_model_state_dict(fresh, {k.removeprefix("base_model.model."): torch.from_numpy(v)
                                            for k, v in state.items()})
    assert not [k for k in res.unexpected_keys if "lora" in k]
    out, (x, ehs, ids) = _jax_out(module, apply_lora(params, lora))
    assert rel_err(out, _torch_unet(fresh, x, 0.7, ehs, ids)) <= TOL
    again = load_lora(folder)  # and back: identical tensors and scalings
    assert sorted(again.weights) == sorted(lora.weights)
    for k in lora.weights:
        assert again.scaling(k) == lora.scaling(k)
        assert all(np.array_equal(u, v) for u, v in zip(again.weights[k], lora.weights[k]))


def _read(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_apply_lora_keeps_the_tree_and_unadapted_leaves(unet):
    _, _, params = unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, k.shape[0])).astype(np.float32), rng.normal(size=(k.shape[1], 2)).astype(np.float32)
    out = apply_lora(params, LoRA({name: (a, b)}, {name: 4.0}))
    assert jax.tree.structure(out) == jax.tree.structure(params)
    new = out["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    np.testing.assert_allclose(np.asarray(new), np.asarray(k) + 2.0 * (b @ a).T, rtol=1e-5, atol=1e-6)
    assert out["conv_in"]["kernel"] is params["conv_in"]["kernel"]
    # the scale may be traced: one compile serves every scale
    f = jax.jit(lambda p, s: apply_lora(p, LoRA({name: (a, b)}, {name: 4.0}), scale=s))
    f(params, 0.5), f(params, 0.25)
    assert f._cache_size() == 1


def test_bad_adapters_are_refused(unet, tmp_path):
    _, _, params = unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    a, b = np.ones((2, k.shape[0]), np.float32), np.ones((k.shape[1], 2), np.float32)
    with pytest.raises(LoRAError, match="not a linear layer of this UNet"):
        apply_lora(params, LoRA({"down_blocks.9.attn1.to_q": (a, b)}, {"down_blocks.9.attn1.to_q": 1.0}))
    with pytest.raises(LoRAError, match="do not fit"):
        apply_lora(params, LoRA({name: (a[:, :-1], b)}, {name: 1.0}))
    save_file({"conv.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoRAError, match="not a LoRA tensor"):
        load_lora(tmp_path / "x.safetensors")
    (tmp_path / "p").mkdir()
    save_file({f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b},
              str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match="adapter_config.json"):
        load_lora(tmp_path / "p")
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    with pytest.raises(LoRAError, match="rank 2 but"):
        load_lora(tmp_path / "p")
    (tmp_path / "t.safetensors").write_bytes(b"\x00\x01truncated")
    with pytest.raises(LoRAError, match="not a readable safetensors"):
        load_lora(tmp_path / "t.safetensors")
    with pytest.raises(LoRAError, match="does not exist"):
        load_lora(tmp_path / "missing")


def test_pipeline_with_lora_equals_diffusers_with_peft(tiny_pipeline, tmp_path):
    """pipe.load_lora_weights: the video equals diffusers' pipeline whose UNet carries the same peft adapter;
    set_adapters changes the weight without recompiling; unload restores the base params exactly."""
    from test_pipeline import F, H, W, _image, _reference

    from svd_jax import StableVideoDiffusionPipeline

    ref, folder = tiny_pipeline
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    base = pipe.params["unet"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "to_out.0"])
    ref2 = copy.deepcopy(ref)
    ref2.unet = _with_peft(ref.unet, config, seed=5)
    name = pipe.load_lora_weights(_peft_folder(ref2.unet, config, tmp_path / "a"), scale=1.0)
    image = _image()
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (1, F, H // 8, W // 8, 4)))
    kw = dict(num_inference_steps=2)
    run = lambda: pipe(image, height=H, width=W, num_frames=F, seed=5, latents=latents, output_type="np",
                       **kw).frames
    out = run()
    assert rel_err(out, _reference(ref2, image, 5, latents, **kw)) <= TOL
    count = pipe.trace_count
    pipe.set_adapters(name, 0.5)
    for layer in ref2.unet.modules():
        if hasattr(layer, "set_scale") and hasattr(layer, "lora_A"):
            layer.set_scale("default", 0.5)
    assert rel_err(run(), _reference(ref2, image, 5, latents, **kw)) <= TOL
    assert pipe.trace_count == count  # a new weight is new values, not a new program
    pipe.unload_lora_weights()
    assert pipe.params["unet"] is base
    assert rel_err(run(), _reference(ref, image, 5, latents, **kw)) <= TOL
    with pytest.raises(LoRAError, match="unknown adapters"):
        pipe.set_adapters("nope")


def test_unfused_adapters_equal_fused_and_reweight_without_recompiling(tiny_pipeline, tmp_path):
    """unfuse_lora: the program adds the adapters itself; the video equals the fused one for two adapters and
    weights, a new weight is no new program, fuse_lora returns to the fused params, unload to the base."""
    from test_pipeline import F, H, W, _image

    from svd_jax import StableVideoDiffusionPipeline

    _, folder = tiny_pipeline
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    base = pipe.params["unet"]
    save_lora(random_lora(base, seed=1), tmp_path / "one")
    save_lora(random_lora(base, ("to_k", "ff.net.2", "proj_in"), rank=3, alpha=1.5, seed=2), tmp_path / "two")
    with pytest.raises(LoRAError, match="no adapter is loaded"):
        pipe.unfuse_lora()
    pipe.load_lora_weights(tmp_path / "one", adapter_name="one")
    pipe.load_lora_weights(tmp_path / "two", adapter_name="two", scale=0.7)
    image = _image()
    run = lambda: pipe(image, height=H, width=W, num_frames=F, seed=5, num_inference_steps=2,
                       output_type="np").frames
    fused = run()
    fused_params = pipe.params["unet"]
    pipe.unfuse_lora()
    assert pipe.params["unet"] is base and len(pipe.params["lora"]) == 2
    unfused = run()
    # the kernels the program builds equal the eagerly fused ones but for float32 rounding (XLA orders the
    # product differently), and so does the video, within the suite's tolerance
    from svd_jax.pipeline.pipeline import _with_unfused_lora

    inside = jax.jit(_with_unfused_lora)(pipe.params)["unet"]
    for u, v in zip(jax.tree.leaves(inside), jax.tree.leaves(fused_params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6)
    assert rel_err(unfused, fused) <= TOL
    count = pipe.trace_count
    pipe.set_adapters(["one", "two"], [0.3, 1.2])
    reweighted = run()
    assert pipe.trace_count == count  # the weights are values of the same program
    pipe.fuse_lora()
    assert "lora" not in pipe.params
    assert rel_err(run(), reweighted) <= TOL
    assert rel_err(reweighted, fused) > 1e-3  # the weights did change the video
    pipe.set_adapters(["one", "two"], [1.0, 0.7])
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(pipe.params["unet"]),
                                                     jax.tree.leaves(fused_params)))
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert pipe.params["unet"] is base and "lora" not in pipe.params


def test_save_lora_in_the_diffusers_naming_round_trips(unet, tmp_path):
    """format="diffusers": one pytorch_lora_weights.safetensors (unet.* keys, per-module alpha) that load_lora
    reads back to the same adapter, ranks and alphas differing per module; use_rslora is refused there."""
    _, _, params = unet
    one = random_lora(params, ("to_q", "to_k"), rank=2, alpha=3.0, seed=4)
    two = random_lora(params, ("to_out.0",), rank=3, alpha=1.5, seed=5)
    lora = LoRA({**one.weights, **two.weights}, {**one.alphas, **two.alphas})
    folder = save_lora(lora, tmp_path / "d", format="diffusers")
    keys = set(_read(folder / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("unet.") for k in keys) and any(k.endswith(".alpha") for k in keys)
    back = load_lora(folder)
    assert sorted(back.weights) == sorted(lora.weights) and not back.use_rslora
    for m in lora.weights:
        assert back.scaling(m) == lora.scaling(m)
        assert all(np.array_equal(u, v) for u, v in zip(back.weights[m], lora.weights[m]))
    with pytest.raises(LoRAError, match="no use_rslora"):
        save_lora(LoRA(lora.weights, lora.alphas, use_rslora=True), tmp_path / "r", format="diffusers")
    with pytest.raises(LoRAError, match="format must be"):
        save_lora(lora, tmp_path / "x", format="kohya")
