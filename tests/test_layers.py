"""Memory-shaping helpers of svd_jax.models.xla_ops and the layers using them: same values as the plain
computation, and XLA's memory plan (compiled ``memory_analysis``, nothing run at full size) holds one slice or one
kernel, not the whole tensor. The XLA:CPU workarounds apply only where their predicate says."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svd_jax.models import layers, xla_ops
from svd_jax.options import ModelOptions
from conftest import rel_err

MiB = 2**20


def _temp_bytes(fn, *args) -> int:
    """XLA's temporary allocation (bytes) of jit(fn) compiled for abstract args (nothing allocated or run)."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_map_chunks_equals_whole():
    rng = np.random.default_rng(0)
    # In place (fn keeps the slice's shape and dtype; each slice read before it is overwritten): 6 slices.
    x = jnp.asarray(rng.normal(size=(48, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32)
    fn = lambda s: s + jnp.tanh(s @ w)
    out, kept = jax.jit(lambda a: (xla_ops.map_chunks(fn, a, 0, 8), a + 0))(x)
    assert rel_err(out, fn(x)) <= 1e-6
    np.testing.assert_array_equal(kept, x)  # x used after the in-place loop: the loop worked on a copy
    # Output buffer (channels change) along a middle axis: 4 slices.
    y = jnp.asarray(rng.normal(size=(3, 20, 16)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(16, 7)) / 4, jnp.float32)
    fn2 = lambda s: jnp.tanh(s @ w2) * s[..., :1]
    out2 = jax.jit(lambda a: xla_ops.map_chunks(fn2, a, 1, 5))(y)
    assert out2.shape == (3, 20, 7)
    assert rel_err(out2, fn2(y)) <= 1e-6


def test_map_chunks_in_place_needs_no_second_buffer():
    """fn keeping the slice's shape: the loop overwrites its (intermediate) input slice by slice. With an output
    buffer beside the input, the 32 MiB input 2 * a is a temporary next to the output (measured: 38 MiB temp;
    in place: 6 MiB, the slices' intermediates)."""
    n, c = 8192, 1024  # float32: 32 MiB
    w = jnp.full((c, c), 0.01, jnp.float32)
    fn = lambda s: s + jnp.tanh(s @ w)
    temp = _temp_bytes(lambda a: xla_ops.map_chunks(fn, a * 2, 0, 256), jax.ShapeDtypeStruct((n, c), jnp.float32))
    assert temp < 0.5 * n * c * 4, f"{temp / MiB:.1f} MiB temporary"


def test_barrier_slice_converts_slices_in_the_loop():
    """float32 sums of squares over bfloat16 tiles in lax.map: each tile is converted in the loop. Tying only
    the slice to a barrier, XLA converted the whole 64 MiB input to float32 before the loop (measured: 132 MiB
    temp, 2x the input; tied to the index: 4 MiB, one float32 tile)."""
    def tile_sums(x, tile):
        def one(i):
            return jnp.sum(jnp.square(xla_ops.barrier_slice(x, i * tile, tile, 0).astype(jnp.float32)))
        return jax.lax.map(one, jnp.arange(x.shape[0] // tile))

    t, r, c = 32, 1024, 1024  # bfloat16: 64 MiB, float32: 128 MiB
    temp = _temp_bytes(lambda x: tile_sums(x, 1), jax.ShapeDtypeStruct((t, r, c), jnp.bfloat16))
    assert temp < t * r * c * 4 / 8, f"{temp / MiB:.1f} MiB temporary"
    small = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5, 4)), jnp.bfloat16)
    ref = jnp.sum(jnp.square(small.astype(jnp.float32)).reshape(3, -1), axis=1)
    assert rel_err(jax.jit(lambda x: tile_sums(x, 2))(small), ref) <= 1e-6


# Bfloat16 convolutions (XLA:CPU makes a float32 copy of each kernel) in a 3-step lax.scan, the kernels loop
# invariants: the 1x1 stack takes XLA's convolution, the 3x3 one (16 output pixels) the per-tap matmuls. Prints
# the compiled temporary size in float32 kernels of one layer.
CONV_SCAN_SCRIPT = """
import flax.linen as nn, jax, jax.numpy as jnp
from svd_jax.models import layers

class Stack(nn.Module):
    channels: int
    kernel: tuple

    @nn.compact
    def __call__(self, x):
        for i in range(8):
            x = layers.Conv(self.channels, self.kernel, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name=f"c{i}")(x)
        return x

for channels, kernel, hw in [(1024, (1, 1), 8), (384, (3, 3), 4)]:
    m = Stack(channels, kernel)
    x = jax.ShapeDtypeStruct((1, hw, hw, channels), jnp.bfloat16)
    params = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    steps = lambda p, x: jax.lax.scan(lambda h, _: (m.apply(p, h), None), x, None, length=3)[0]
    temp = jax.jit(steps).lower(params, x).compile().memory_analysis().temp_size_in_bytes
    print(temp / (kernel[0] * kernel[1] * channels * channels * 4))
"""


def test_conv_kernel_float32_copies_made_per_layer():
    """Tied to the layer's input, each kernel's float32 copy is made when the layer runs, not hoisted out of the
    scan (measured: ~1.05 / 1.13 float32 kernels; untied: 8.1, all 8 layers' copies live at once). Holds with
    XLA:CPU's concurrency-optimised scheduler off (it runs independent copies early); that flag is read when jax
    starts, hence the subprocess."""
    if jax.default_backend() != "cpu":
        pytest.skip("the float32 kernel copy is XLA:CPU's")
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CONV_SCAN_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = [float(v) for v in proc.stdout.split()]
    assert len(kernels) == 2 and all(k < 3 for k in kernels), kernels


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_forward_chunk_budget_rejects_non_positive_int(bad):
    with pytest.raises(ValueError, match="positive number of bytes or None"):
        ModelOptions(forward_chunk_bytes=bad)


def _conv_jaxpr(options, dtype, hw):
    conv = layers.Conv(8, (3, 3), dtype=dtype, param_dtype=dtype, options=options)
    x = jnp.ones((1, hw, hw, 4), dtype)
    params = conv.init(jax.random.PRNGKey(0), x)
    return str(jax.make_jaxpr(lambda p, a: conv.apply(p, a))(params, x)), conv, params, x


def test_cpu_workarounds_apply_only_on_cpu():
    """The im2col path for small convolutions and the bf16 kernel barrier are XLA:CPU workarounds: their
    predicates hold for platform "cpu" only, and a Conv built for another platform runs XLA's convolution
    without the barrier (same values)."""
    cpu, gpu = ModelOptions(platform="cpu"), ModelOptions(platform="gpu")
    assert xla_ops.small_conv_as_matmul(cpu, (1, 1), 16) and not xla_ops.small_conv_as_matmul(gpu, (1, 1), 16)
    assert not xla_ops.small_conv_as_matmul(cpu, (2, 2), 16)
    assert not xla_ops.small_conv_as_matmul(cpu, (1, 1), xla_ops.SMALL_CONV_PIXELS + 1)
    assert xla_ops.conv_kernel_barrier(cpu, jnp.bfloat16) and not xla_ops.conv_kernel_barrier(cpu, jnp.float32)
    assert not xla_ops.conv_kernel_barrier(gpu, jnp.bfloat16)
    small_cpu, conv, params, x = _conv_jaxpr(cpu, jnp.float32, 4)
    small_gpu = _conv_jaxpr(gpu, jnp.float32, 4)[0]
    assert "conv_general_dilated" not in small_cpu and "conv_general_dilated" in small_gpu
    np.testing.assert_allclose(conv.apply(params, x), conv.clone(options=gpu).apply(params, x), rtol=1e-5,
                               atol=1e-5)
    assert "optimization_barrier" in _conv_jaxpr(cpu, jnp.bfloat16, 8)[0]
    assert "optimization_barrier" not in _conv_jaxpr(gpu, jnp.bfloat16, 8)[0]
    assert ModelOptions().backend() == jax.default_backend()  # platform None: jax's default backend


def test_dense_equals_flax_dense_and_checks_shapes():
    """layers.Dense (params through layers.param, which skips Flax's per-apply initializer trace) computes
    flax.linen.Dense's maths on the same params, and rejects a wrongly shaped parameter with Flax's error."""
    import flax

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6))
    ours = layers.Dense(4)
    params = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_map(jnp.shape, params) == {"params": {"kernel": (6, 4), "bias": (4,)}}
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # a non-zero bias too
    np.testing.assert_allclose(ours.apply(params, x), flax.linen.Dense(4).apply(params, x), rtol=1e-6, atol=1e-6)
    bad = {"params": {"kernel": jnp.ones((7, 4)), "bias": jnp.ones((4,))}}
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"kernel.*shape \(6, 4\).*has shape \(7, 4\)"):
        ours.apply(bad, x)
