"""Flax UNetSpatioTemporalConditionModel equals diffusers' on the same weights (fp32, CPU)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from svd_jax.configs import SVD_XT_UNET  # {}: the diffusers constructor defaults are the SVD-XT config
from svd_jax.models import UNetSpatioTemporalConditionModel
from svd_jax.models.layers import Attention
from svd_jax.weights import flatten_shapes, load_params, plan_conversion
from conftest import fast_compile_options, make_unet_pair, reference_keys, rel_err

TOL = 1e-4

# Several levels, cross-attention and plain blocks, >1 head, per-block heads and transformer depths.
TINY = dict(in_channels=8, out_channels=4, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                              "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                            "CrossAttnUpBlockSpatioTemporal"),
            num_attention_heads=(2, 4, 4), cross_attention_dim=24, addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24, layers_per_block=2, transformer_layers_per_block=(1, 2, 1),
            num_frames=3)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    return (*make_unet_pair(TINY, folder), folder)


def _torch_unet(model, x, t, ehs, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 1, 4, 2, 3).contiguous(), torch.as_tensor(t),
                    torch.from_numpy(ehs), torch.from_numpy(ids)).sample
    return out.permute(0, 1, 3, 4, 2).numpy()


def _inputs(seed, b, f, h, w, s, c_in=8, d=24):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, f, h, w, c_in)).astype(np.float32)
    ehs = rng.normal(size=(b, s, d)).astype(np.float32)
    ids = np.array([[6, 127, 0.02], [3, 30, 0.5]][:b], np.float32)
    return x, ehs, ids


# non-square; odd level sizes (6 -> 3 -> 2, forwarded upsample sizes); S > 1 cross-attention tokens;
# positive, negative and per-item timesteps
@pytest.mark.parametrize("h,w,s,t", [(8, 12, 1, 1.6377), (6, 10, 1, -1.5537),
                                     (8, 4, 2, np.array([0.3, -0.7], np.float32))])
def test_tiny_unet_matches_diffusers(tiny_unet, h, w, s, t):
    model, module, params, _ = tiny_unet
    x, ehs, ids = _inputs(1, 2, 3, h, w, s)
    out = jax.jit(lambda p, *a: module.apply({"params": p}, *a).sample)(params, x, jnp.asarray(t), ehs, ids)
    assert out.shape == (2, 3, h, w, 4)
    assert rel_err(out, _torch_unet(model, x, t, ehs, ids)) <= TOL


def test_batch_items_are_independent_and_conditioned(tiny_unet):
    """B=2 with different added_time_ids: each item equals its own single-item run; the ids matter."""
    _, module, params, _ = tiny_unet
    x, ehs, ids = _inputs(2, 2, 3, 8, 8, 1)
    f = jax.jit(lambda p, *a: module.apply({"params": p}, *a).sample)
    both = f(params, x, 0.5, ehs, ids)
    one = f(params, x[1:], 0.5, ehs[1:], ids[1:])
    np.testing.assert_allclose(both[1:], one, rtol=1e-5, atol=1e-5)
    swapped = f(params, x[1:], 0.5, ehs[1:], ids[:1])
    assert float(jnp.abs(swapped - one).max()) > 1e-3


@pytest.mark.slow  # > 1 min on 2 cores; CI runs it after the README command
@pytest.mark.parametrize("chunk_size,chunk_dim", [(3, 0), (1, 1)])
def test_forward_chunking_equals_unchunked(tiny_unet, chunk_size, chunk_dim):
    model, module, params, folder = tiny_unet
    chunked, _ = UNetSpatioTemporalConditionModel.from_pretrained(folder)
    chunked = chunked.clone(forward_chunk_size=chunk_size, forward_chunk_dim=chunk_dim)
    x, ehs, ids = _inputs(3, 2, 3, 8, 8, 1)
    a = module.apply({"params": params}, x, 1.0, ehs, ids).sample
    b = chunked.apply({"params": params}, x, 1.0, ehs, ids).sample
    # Same maths; only the matmul blocking (one row vs many) differs, i.e. float32 rounding.
    assert rel_err(b, a) <= 2e-6
    model.enable_forward_chunking(chunk_size, chunk_dim)
    try:
        assert rel_err(b, _torch_unet(model, x, 1.0, ehs, ids)) <= TOL
    finally:
        for m in model.modules():  # diffusers has no disable_forward_chunking
            if hasattr(m, "set_chunk_feed_forward"):
                m.set_chunk_feed_forward(None, dim=0)
    bad = module.clone(forward_chunk_size=5, forward_chunk_dim=0)
    with pytest.raises(ValueError, match="not divisible by chunk_size 5"):
        bad.apply({"params": params}, x, 1.0, ehs, ids)


def test_auto_forward_chunking_equals_unchunked(tiny_unet, monkeypatch):
    """Feed-forwards above the budget (options.forward_chunk_bytes) run over row slices (leading axes flattened,
    zero-padded to whole slices): same output as unsliced; the slicing loops are traced, except in a partitioned
    program."""
    from svd_jax.models import layers, xla_ops
    from svd_jax.options import ModelOptions

    _, module, params, _ = tiny_unet
    x, ehs, ids = _inputs(4, 2, 3, 8, 8, 1)
    # Hidden layers here: 384 rows x 1 KiB, 96 rows x 2 KiB, 24 rows x 2 KiB. 40 kB: 10 slices of 39 rows (390),
    # 5 slices of 20 rows (100), 2 slices of 12 rows.
    budget = 40_000
    calls = []  # [rows, (padded rows, slice rows) or None] per feed-forward
    rows_fn, chunks = xla_ops.map_rows, xla_ops.map_chunks

    def spy_rows(ff, h, row_bytes, budget):
        calls.append([int(np.prod(h.shape[:-1])), None])
        return rows_fn(ff, h, row_bytes, budget)

    def spy_chunks(fn, h, axis, size):
        calls[-1][1] = (h.shape[axis], size)
        return chunks(fn, h, axis, size)

    monkeypatch.setattr(layers, "map_rows", spy_rows)  # spies: they record the calls and run the real ones
    monkeypatch.setattr(xla_ops, "map_chunks", spy_chunks)

    def trace(budget, sharded=False):
        """(traced program, its loop equations), with the budget set through the module's options.
        map_chunks' fori_loop (static bounds) traces as a scan."""
        del calls[:]
        m = module.clone(options=ModelOptions(forward_chunk_bytes=budget, partitioned=sharded))
        traced = jax.jit(lambda p: m.apply({"params": p}, x, 1.0, ehs, ids).sample).trace(params)
        text = str(traced.jaxpr)
        return traced, text.count("while[") + text.count("scan[")

    def run(traced):  # compile-time savers (conftest.FAST_COMPILE_FLAGS) where this jaxlib knows them
        lowered = traced.lower()
        try:
            compiled = lowered.compile(compiler_options=fast_compile_options())
        except jax.errors.JaxRuntimeError:
            compiled = lowered.compile()
        return compiled(params)

    whole, whole_loops = trace(None)
    assert calls and all(c is None for _, c in calls), calls  # feed-forwards seen, none sliced
    sliced, sliced_loops = trace(budget)
    assert calls and all(c is not None for _, c in calls), calls  # every feed-forward sliced
    assert all(n >= r and n % s == 0 and n // s > 1 for r, (n, s) in calls), calls  # several whole slices
    assert any(n > r for r, (n, s) in calls), calls  # zero rows padded
    assert sliced_loops >= whole_loops + len(calls)
    _, sharded_loops = trace(budget, sharded=True)  # slicing a device-split axis would gather it
    assert calls and all(c is None for _, c in calls), calls
    assert sharded_loops == whole_loops
    # Same maths; only the matmul blocking (row slices) differs, i.e. float32 rounding.
    assert rel_err(run(sliced), run(whole)) <= 2e-6


def test_single_token_fast_path_equals_attention():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 16))
    c = jax.random.normal(jax.random.PRNGKey(1), (3, 1, 12))
    fast = Attention(heads=2, dim_head=8)
    slow = Attention(heads=2, dim_head=8, single_token_fast_path=False)
    p = slow.init(jax.random.PRNGKey(2), x, c)
    assert flatten_shapes(p) == flatten_shapes(fast.init(jax.random.PRNGKey(2), x, c))
    np.testing.assert_allclose(fast.apply(p, x, c), slow.apply(p, x, c), rtol=1e-6, atol=1e-6)


def test_bad_inputs(tiny_unet):
    _, module, params, _ = tiny_unet
    x, ehs, ids = _inputs(0, 2, 3, 8, 4, 1)  # h, w != channels, so a channels-first tensor has another shape
    v = {"params": params}
    with pytest.raises(ValueError, match=r"\(B, F, h, w, 8\).*channels-first"):
        module.apply(v, np.transpose(x, (0, 1, 4, 2, 3)), 1.0, ehs, ids)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or \(2,\)"):
        module.apply(v, x, np.ones(3), ehs, ids)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(2, S, 24\)"):
        module.apply(v, x, 1.0, ehs[..., :20], ids)
    with pytest.raises(ValueError, match=r"added_time_ids must be \(2, 3\)"):
        module.apply(v, x, 1.0, ehs, ids[:, :2])


def test_full_size_unet_coverage():
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    with torch.device("meta"):
        model = TorchUNet(**SVD_XT_UNET)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd == reference_keys("unet")
    module = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET)
    target = flatten_shapes(module.init_params_abstract())
    plan = plan_conversion(target, sd)
    assert len(plan.entries) == len(target) == 1428
    assert sum(math.prod(s) for s in target.values()) == 1_524_623_082


@pytest.mark.slow
def test_full_size_unet_numerics():
    """The real architecture with random weights (norms, biases, mix factors perturbed) at a small latent."""
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    torch.manual_seed(0)
    model = TorchUNet(**SVD_XT_UNET).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # cheap to perturb, and enough to move every norm, bias and mix factor off 0/1
                mix = 1.0 * torch.randn(p.shape, generator=g) if name.endswith("mix_factor") else 0
                p.add_(0.1 * torch.randn(p.shape, generator=g) + mix)
    module = UNetSpatioTemporalConditionModel.from_config(SVD_XT_UNET)
    params = load_params(module.init_params_abstract(), {k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 2, 8, 8, 8)).astype(np.float32)
    ehs = rng.normal(size=(2, 1, 1024)).astype(np.float32)
    ids = np.array([[6, 127, 0.02], [3, 30, 0.5]], np.float32)
    ref = _torch_unet(model, x, 0.8, ehs, ids)
    del model
    out = jax.jit(lambda p, *a: module.apply({"params": p}, *a).sample)(params, x, 0.8, ehs, ids)
    err = rel_err(out, ref)
    print(f"full-size UNet rel err {err:.2e}")
    assert err <= 1e-3


@pytest.mark.parametrize("shape,kernel,pad", [((2, 2, 4, 16), (3, 3), ((1, 1), (1, 1))),
                                              ((1, 3, 2, 2, 8), (3, 1, 1), ((1, 1), (0, 0), (0, 0)))])
def test_small_conv_matmul_path_equals_xla_conv(shape, kernel, pad):
    """Tiny spatial sizes run convs as per-tap matmuls on XLA:CPU (its conv is pathological there): same result."""
    from svd_jax.models import layers, xla_ops

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    conv = layers.Conv(12, kernel, padding=pad)
    p = conv.init(jax.random.PRNGKey(1), x)
    k = p["params"]["kernel"]
    dims = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[len(kernel)]
    ref = jax.lax.conv_general_dilated(x, k, (1,) * len(kernel), pad, dimension_numbers=dims) + p["params"]["bias"]
    assert np.prod(shape[1:-1]) <= xla_ops.SMALL_CONV_PIXELS
    np.testing.assert_allclose(conv.apply(p, x), ref, rtol=1e-5, atol=1e-5)
