"""The fine-tuning objective on the full-size SVD-XT UNet: svd_jax.training.denoising_loss and its gradient with
respect to every one of the 1428 parameter tensors equal the EDM v-objective of diffusers' UNet under torch
autograd (conftest.torch_edm_loss), fp32, random perturbed weights, one clip of 2 frames at an 8 x 8 latent.

The fp32 model is 6.1 GB; torch's weights and gradients (12 GB) and JAX's (12 GB) do not fit in memory together.
So torch goes first: each gradient goes to disk (one .npy per tensor) as autograd produces it and is dropped, the
weights to a diffusers folder (save_pretrained, safetensors), and the model is freed; svd-jax then loads that
folder and computes its gradients (the weights donated to them, so JAX too holds about one copy), compared tensor
by tensor with the stored ones.
"""

import contextlib
import ctypes
import gc
import json
import re
import resource
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from svd_jax.configs import SVD_XT_UNET
from svd_jax.models import UNetSpatioTemporalConditionModel
from svd_jax.training import denoising_loss
from svd_jax.weights import path_to_torch_name
from conftest import fast_compile_options, perturb_, torch_edm_loss

B, F, H, W = 1, 2, 8, 8  # latents; the UNet's levels 8, 4, 2, 1 rows


class PeakRSS:
    """The process's resident memory, sampled every 50 ms on a thread: the peak of each phase (GB), all of it
    (``rss``) and the anonymous part (``anon``; the rest is file pages mapped in, e.g. the safetensors being read,
    which the system can drop)."""

    def __init__(self):
        self.peaks, self.phase, self._stop = {}, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> dict:
        with open("/proc/self/status") as f:
            kb = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon")))
        return {"rss": int(kb["VmRSS"].split()[0]) / 1e6, "anon": int(kb["RssAnon"].split()[0]) / 1e6}

    def _record(self):
        now, peak = self.sample(), self.peaks.setdefault(self.phase, {"rss": 0.0, "anon": 0.0})
        for k, v in now.items():
            peak[k] = max(peak[k], v)

    def _run(self):
        while not self._stop.wait(0.05):
            if self.phase is not None:
                self._record()

    def start(self, phase):
        self.phase = phase
        self._record()
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def _release_freed_memory():
    """Hand the C heap's free pages back to the system (glibc keeps small freed blocks otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the memory stays with the process (headroom)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _exactly_zero(name: str) -> bool:
    """Whether the exact gradient of this tensor is zero for these inputs: an attention over one key returns its
    value whatever the query, so the query and key projections of every cross-attention (its key: the one CLIP
    token) and of the mid block's spatial self-attention (one pixel per frame at an 8 x 8 latent) get none, nor
    does each transformer block's norm2, which only feeds its cross-attention's query."""
    cross = re.search(r"transformer_blocks\.\d+\.(attn2\.to_[qk]\.weight|norm2\.(weight|bias))$", name)
    mid = re.fullmatch(r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn1\.to_[qk]\.weight", name)
    return bool(cross or mid)


def _inputs():
    rng = np.random.default_rng(0)
    return dict(x0=rng.normal(size=(B, F, H, W, 4)).astype(np.float32),
                image_latents=rng.normal(size=(B, H, W, 4)).astype(np.float32),
                image_embeds=rng.normal(size=(B, 1, 1024)).astype(np.float32),
                added_time_ids=np.array([[6, 127, 0.02]], np.float32),
                sigma=np.array([0.9], np.float32),
                noise=rng.normal(size=(B, F, H, W, 4)).astype(np.float32))


def _torch_side(folder, grads_dir, batch, mem, seconds):
    """Build, perturb, differentiate and save the diffusers UNet; returns (loss, {name: max |grad|})."""
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    t = time.perf_counter()
    mem.start("torch build")
    torch.manual_seed(0)
    model = perturb_(TorchUNet(**SVD_XT_UNET), seed=5)
    seconds["torch build + perturb"] = time.perf_counter() - t

    t = time.perf_counter()
    mem.start("torch forward + backward")
    grad_max = {}

    def to_disk(name):  # each gradient to disk as soon as autograd has it, then dropped: torch never holds them all
        def hook(p):
            g = p.grad.numpy()
            grad_max[name] = float(np.abs(g).max())
            np.save(grads_dir / f"{name}.npy", g)
            p.grad = None
        return hook

    hooks = [p.register_post_accumulate_grad_hook(to_disk(n)) for n, p in model.named_parameters()]
    loss = torch_edm_loss(model, **batch)
    loss.backward()
    for h in hooks:
        h.remove()
    assert len(grad_max) == len(list(model.parameters()))
    seconds["torch forward + backward"] = time.perf_counter() - t

    t = time.perf_counter()
    mem.start("torch save")
    model.save_pretrained(folder)
    seconds["torch save"] = time.perf_counter() - t
    return float(loss.detach()), grad_max


@pytest.mark.slow
def test_full_size_loss_and_gradients_equal_torch(tmp_path):
    t0 = time.perf_counter()
    mem, seconds = PeakRSS(), {}
    batch = _inputs()
    folder, grads_dir = tmp_path / "unet", tmp_path / "grads"
    grads_dir.mkdir()
    try:
        ref_loss, ref_max = _torch_side(folder, grads_dir, batch, mem, seconds)
        _release_freed_memory()  # the torch model is gone with _torch_side's frame
        mem.start("after torch")

        t = time.perf_counter()
        mem.start("jax load")
        module, params = UNetSpatioTemporalConditionModel.from_pretrained(folder)
        seconds["jax load"] = time.perf_counter() - t

        t = time.perf_counter()
        mem.start("jax compile + gradients")
        lowered = jax.jit(jax.value_and_grad(lambda p: denoising_loss(module, p, **batch)),
                          donate_argnums=0).lower(params)
        try:  # compile-time savers (conftest.FAST_COMPILE_FLAGS; codegen only, 2.4x faster here) where known
            compiled = lowered.compile(compiler_options=fast_compile_options())
        except jax.errors.JaxRuntimeError:
            compiled = lowered.compile()
        loss, grads = compiled(params)
        loss = float(loss)
        del params
        seconds["jax compile + gradients"] = time.perf_counter() - t

        t = time.perf_counter()
        mem.start("compare")
        scale = max(ref_max.values())
        zero = {k for k, m in ref_max.items() if m <= 1e-6 * scale}
        want_zero = {k for k in ref_max if _exactly_zero(k)}
        errs, zero_max, names = {}, {}, set()
        for path, g in traverse_util.flatten_dict(grads).items():
            name, to_torch = path_to_torch_name(path, g.ndim)
            names.add(name)
            got = to_torch(np.asarray(g))
            want = np.load(grads_dir / f"{name}.npy", mmap_mode="r")
            assert got.shape == want.shape, (name, got.shape, want.shape)
            if name in zero:
                zero_max[name] = float(np.abs(got).max()) / scale
            else:  # rel_err's criterion, max |got - want| / max |want|, in float32 (rel_err's float64: 2x slower)
                errs[name] = float(np.abs(got - want).max() / np.abs(want).max())
        seconds["compare"] = time.perf_counter() - t
    finally:
        mem.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)  # 12 GB; pytest would keep the last three runs' folders
    seconds["total"] = time.perf_counter() - t0
    worst = max(errs.items(), key=lambda kv: kv[1])
    report = dict(loss=loss, torch_loss=ref_loss, loss_rel_err=abs(loss - ref_loss) / abs(ref_loss),
                  live=len(errs), zero=len(zero), worst_live=worst, worst_zero=max(zero_max.values(), default=0.0),
                  grad_scale=scale, seconds=seconds, peak_rss_gb=mem.peaks,
                  ru_maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    print("full-size training loss:", json.dumps(report))

    assert names == set(ref_max) and len(names) == 1428  # every parameter tensor got a gradient, both sides
    assert isinstance(grads, dict) and jnp.result_type(*jax.tree_util.tree_leaves(grads)) == jnp.float32
    assert np.isfinite(loss) and loss > 0
    assert report["loss_rel_err"] <= 1e-4, (loss, ref_loss)
    # the tensors whose gradient is zero (float noise) on the torch side are exactly those that must have none
    assert zero == want_zero and len(zero) == 130, (sorted(zero - want_zero), sorted(want_zero - zero))
    # the same criterion as tests/test_training_loss.py: a tensor whose exact gradient is zero stays float noise
    assert report["worst_zero"] <= 1e-6, zero_max
    assert worst[1] <= 1e-4, worst
