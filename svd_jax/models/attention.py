"""The one attention entry point of svd-jax, with its backends.

Every attention in the three networks (CLIP self-attention, VAE mid-block attention, UNet spatial and
temporal attention) calls :func:`dot_product_attention`. The backend comes from the ``implementation``
argument, else from ``options.attention`` (:class:`~svd_jax.options.ModelOptions`, a field of every module that
attends; default ``"auto"``):

* ``"xla"``: the plain formula; materialises the (heads, Sq, Sk) scores. Fastest for short sequences.
* ``"blockwise"``: online softmax over key blocks (``lax.scan``) for query blocks (``lax.map``): peak memory
  is set by the block sizes (``options.attention_q_block`` / ``attention_k_block``), never by Sq x Sk. Works on
  every backend and every head size (the VAE's single 512-dim head included). Blocks are strided subsets of
  the token axis (token i*n + j sits in block j), so a token axis split over devices stays split inside every
  block.
* ``"cudnn"``: cuDNN fused flash attention (``jax.nn.dot_product_attention``), GPU only, bf16/fp16, head_dim
  <= 128. Selecting it elsewhere raises.
* ``"pallas"``: the Pallas TPU flash-attention kernel (``jax.experimental.pallas.ops.tpu``), TPU only, on
  one device (not in a partitioned program, ``options.partitioned``: XLA cannot split a Pallas call, it would
  gather its operands). Token
  axes are padded to multiples of 128 and the padding masked out with segment ids. Selecting it elsewhere
  raises; :func:`pallas_attention` with ``interpret=True`` runs the same kernel on CPU (the tests do).
* ``"auto"``: cuDNN on GPU where it applies; for long sequences (float32 scores of one call above
  ``options.attention_auto_bytes``) the Pallas kernel on a single TPU, else blockwise; else xla.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..options import ATTENTION_BACKENDS, DEFAULT_OPTIONS, ModelOptions

IMPLEMENTATIONS = ATTENTION_BACKENDS


def _check_name(name):
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}")


def _cudnn_applies(q, k, v, options: ModelOptions) -> bool:
    return (options.backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0 and q.shape[-1] == v.shape[-1])


def resolve_implementation(q, k, v, options: ModelOptions = DEFAULT_OPTIONS, implementation: str | None = None) -> str:
    """The backend a call with these operands uses (``implementation``, else ``options.attention``; ``auto``
    resolved)."""
    name = options.attention if implementation is None else implementation
    _check_name(name)
    if name != "auto":
        return name
    if _cudnn_applies(q, k, v, options):
        return "cudnn"
    batch = math.prod(q.shape[:-3]) * q.shape[-2]
    if batch * q.shape[-3] * k.shape[-3] * 4 <= options.attention_auto_bytes:
        return "xla"
    return "pallas" if _pallas_applies(q, v, options) else "blockwise"


def _pallas_applies(q, v, options: ModelOptions) -> bool:
    return (options.backend() == "tpu" and not options.partitioned and q.shape[-1] == v.shape[-1]
            and q.shape[-1] <= 512)


def dot_product_attention(q, k, v, *, scale: float | None = None, options: ModelOptions = DEFAULT_OPTIONS,
                          implementation: str | None = None):
    """softmax(q kᵀ · scale) v per head, logits and softmax in float32.

    Args:
      q: (..., Sq, heads, head_dim), any leading batch dims.
      k: (..., Sk, heads, head_dim).
      v: (..., Sk, heads, head_dim_v).
      scale: defaults to head_dim ** -0.5 (PyTorch SDPA's default).
      options: the backend (``options.attention``), its block sizes and the ``auto`` threshold.
      implementation: one of ``IMPLEMENTATIONS``, overriding ``options.attention``.

    Returns:
      (..., Sq, heads, head_dim_v) in q's dtype.
    """
    if q.ndim < 3 or not q.ndim == k.ndim == v.ndim:
        raise ValueError(f"q, k, v must be (..., S, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:-1] != v.shape[:-1] or q.shape[:-3] != k.shape[:-3] or q.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"q, k, v shapes do not match: {q.shape}, {k.shape}, {v.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_implementation(q, k, v, options, implementation)
    if name == "xla":
        return _plain(q, k, v, scale)
    if name == "blockwise":
        return blockwise_attention(q, k, v, scale=scale, q_block=options.attention_q_block,
                                   k_block=options.attention_k_block)
    if name == "pallas":
        if not _pallas_applies(q, v, options):
            raise ValueError(f"the pallas attention backend needs a TPU, one device (no mesh) and equal q/v head "
                             f"dims <= 512; got platform {options.backend()!r}, partitioned={options.partitioned}, "
                             f"head dims {q.shape[-1]}/{v.shape[-1]}: use 'auto', 'blockwise' or 'xla'")
        return pallas_attention(q, k, v, scale=scale)
    if not _cudnn_applies(q, k, v, options):
        raise ValueError(f"the cudnn attention backend needs a GPU, bf16/fp16 inputs and head_dim <= 128 "
                         f"(a multiple of 8); got platform {options.backend()!r}, {q.dtype}, head_dim "
                         f"{q.shape[-1]}: use 'auto', 'blockwise' or 'xla'")
    lead = q.shape[:-3]
    flat = lambda t: t.reshape((-1,) + t.shape[-3:])  # cuDNN takes (B, S, N, H)
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), scale=scale, implementation="cudnn")
    return out.reshape(lead + out.shape[-3:])


def _plain(q, k, v, scale):
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _blocks(s: int, target: int) -> tuple[int, int]:
    """(number of blocks n, padded length) for a token axis of length s: n divides the padded length, blocks
    hold at most ~target tokens; a divisor of s is preferred so that nothing is padded."""
    n0 = max(1, -(-s // target))
    for n in range(n0, 2 * n0 + 1):
        if s % n == 0:
            return n, s
    return n0, n0 * -(-s // n0)


def blockwise_attention(q, k, v, *, scale: float, q_block: int = DEFAULT_OPTIONS.attention_q_block,
                        k_block: int = DEFAULT_OPTIONS.attention_k_block):
    """Memory-efficient exact attention (online softmax); shapes as :func:`dot_product_attention`.

    Scores live one (q_block x k_block) tile per head at a time, in the forward and (recomputed) in the backward
    pass. Accumulation in float32.
    """
    lead, sq, h, d = q.shape[:-3], q.shape[-3], q.shape[-2], q.shape[-1]
    sk, dv = k.shape[-3], v.shape[-1]
    nq, sq_p = _blocks(sq, q_block)
    nk, sk_p = _blocks(sk, k_block)
    pad = lambda t, n: jnp.pad(t, [(0, 0)] * (t.ndim - 3) + [(0, n - t.shape[-3]), (0, 0), (0, 0)])
    q, k, v = pad(q, sq_p), pad(k, sk_p), pad(v, sk_p)
    # token i * n + j -> block j (strided blocks; see the module docstring)
    qs = jnp.moveaxis(q.reshape(lead + (sq_p // nq, nq, h, d)), -3, 0)  # (nq, ..., qb, h, d)
    ks = jnp.moveaxis(k.reshape(lead + (sk_p // nk, nk, h, d)), -3, 0)
    vs = jnp.moveaxis(v.reshape(lead + (sk_p // nk, nk, h, dv)), -3, 0)
    valid = (jnp.arange(sk_p).reshape(sk_p // nk, nk) < sk).T  # (nk, kb): padded keys masked out
    kb = sk_p // nk

    def one_q_block(qc):  # (..., qb, h, d) -> (..., qb, h, dv)
        qb = qc.shape[-3]
        m0 = jnp.full(lead + (h, qb), -jnp.inf, jnp.float32)
        acc0 = jnp.zeros(lead + (qb, h, dv), jnp.float32)

        def step(carry, blk):
            m, denom, acc = carry
            kc, vc, ok = blk
            s = jnp.einsum("...qhd,...khd->...hqk", qc, kc, preferred_element_type=jnp.float32) * scale
            s = jnp.where(ok.reshape((1,) * (s.ndim - 1) + (kb,)), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
            denom = denom * corr + p.sum(axis=-1)
            pv = jnp.einsum("...hqk,...khd->...qhd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
            acc = acc * jnp.swapaxes(corr, -1, -2)[..., None] + pv
            return (m_new, denom, acc), None

        # Under differentiation each key block's tile is recomputed in the backward pass (only the carry is
        # kept per block), so gradients need no full score matrix either; a forward-only program is unchanged.
        (m, denom, acc), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), (m0, jnp.zeros_like(m0), acc0),
                                          (ks, vs, valid))
        return (acc / jnp.swapaxes(denom, -1, -2)[..., None]).astype(q.dtype)

    # and each query block is recomputed in the backward pass from its queries alone
    out = jax.lax.map(jax.checkpoint(one_q_block, prevent_cse=False), qs)  # (nq, ..., qb, h, dv)
    out = jnp.moveaxis(out, 0, -3).reshape(lead + (sq_p, h, dv))
    return out[..., :sq, :, :]


def _pallas_block(n: int, cap: int) -> int:
    """The largest of 512, 256, 128 (at most ``cap``) that divides n (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if b <= cap and n % b == 0)


def pallas_attention(q, k, v, *, scale: float, interpret: bool = False):
    """The Pallas TPU flash-attention kernel; shapes as :func:`dot_product_attention` (equal q/v head dims).

    Token axes are padded to multiples of 128; padded keys get segment id 0 and real queries 1, so no real query
    sees a padded key. ``interpret=True`` runs the kernel in Pallas' TPU interpreter (any backend; slow).
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    lead, sq, h, d = q.shape[:-3], q.shape[-3], q.shape[-2], q.shape[-1]
    sk = k.shape[-3]
    sq_p, sk_p = -(-sq // 128) * 128, -(-sk // 128) * 128
    to_bhsd = lambda t, n: jnp.pad(t.reshape((-1,) + t.shape[-3:]), [(0, 0), (0, n - t.shape[-3]), (0, 0), (0, 0)]
                                   ).transpose(0, 2, 1, 3)  # the kernel takes (B, heads, S, D)
    qt, kt, vt = to_bhsd(q, sq_p), to_bhsd(k, sk_p), to_bhsd(v, sk_p)
    segments = None
    if sq_p != sq or sk_p != sk:
        b = qt.shape[0]
        ids = lambda n, s: jnp.broadcast_to((jnp.arange(n) < s).astype(jnp.int32), (b, n))
        segments = fa.SegmentIds(q=ids(sq_p, sq), kv=ids(sk_p, sk))
    cap = 512 if d <= 128 else 256  # VMEM: wide heads (the VAE's 512) take smaller tiles
    bq, bk = _pallas_block(sq_p, cap), _pallas_block(sk_p, cap)
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1)
    run = lambda: fa.flash_attention(qt, kt, vt, segment_ids=segments, sm_scale=scale, block_sizes=blocks)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = run()
    else:
        out = run()
    return out.transpose(0, 2, 1, 3)[:, :sq].reshape(lead + (sq, h, d)).astype(q.dtype)
