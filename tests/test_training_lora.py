"""LoRA training (``trainable="lora"``) against peft + torch: the adapter's gradients equal torch autograd through
a peft adapter on diffusers' UNet, AdamW updates equal torch.optim.AdamW on the adapter, the base stays
bit-identical with no optimizer state, and ``svd-jax train --trainable lora`` lowers the loss and writes an adapter
that peft, svd-jax and ``svd-jax generate --lora`` load."""

import copy

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from test_training_run import F as RUN_F
from test_training_run import H as RUN_H
from test_training_run import W as RUN_W
from test_training_run import _args, _eval_loss, _metrics, stripe_videos
from test_training_step import _cond, _config

from svd_jax.cli import main
from svd_jax.lora import DEFAULT_TARGETS, apply_lora, load_lora
from svd_jax.training import TrainConfig, TrainStep
from svd_jax.training.config import TrainConfigError
from svd_jax.training.step import LORA_A, LORA_B, flatten_params
from conftest import rel_err, torch_edm_loss

R, ALPHA = 2, 3.0


@pytest.fixture(scope="module")
def jax_pipe(tiny_pipeline):
    from svd_jax import StableVideoDiffusionPipeline

    return StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline[1], dtype="float32")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return stripe_videos(tmp_path_factory.mktemp("videos"))


def _peft_unet(diffusers_unet, seed=0):
    """A float32 copy of the UNet with a peft adapter (rank R, alpha ALPHA, the default targets) whose A and B are
    both random (peft starts B at zero, which would hide every bug); only the adapter requires grad."""
    m = inject_adapter_in_model(LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS)),
                                copy.deepcopy(diffusers_unet).float())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                p.copy_(0.06 * torch.randn(p.shape, generator=g))
    return m


def _key(torch_name):
    """peft's "<module>.lora_A.default.weight" -> the train state's "<module>.lora_A"."""
    module, part = torch_name.split(".lora_")
    return module + (LORA_A if part.startswith("A") else LORA_B)


def test_lora_gradients_and_adamw_updates_equal_peft_in_torch(tiny_pipeline, jax_pipe):
    """The adapter's loss and gradients equal torch autograd through the same peft adapter; three clipped AdamW
    updates equal torch.optim.AdamW on peft's parameters; the base UNet stays bit-identical and has no optimizer
    state."""
    lr, wd, clip = 5e-3, 0.05, 0.02
    cfg = _config(trainable="lora", lora_rank=R, lora_alpha=ALPHA, learning_rate=lr, weight_decay=wd,
                  max_grad_norm=clip, adam_b1=0.8, adam_b2=0.95, adam_eps=1e-6)
    ts = TrainStep(jax_pipe.unet, None, None, cfg)
    state = ts.init(jax_pipe.params["unet"])
    model = _peft_unet(tiny_pipeline[0].unet, seed=1)
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(state.params) == sorted(_key(n) for n in lora_params)  # the same layers adapted as peft's
    a0 = jax.device_get(state.params)
    assert all(not a0[k].any() for k in a0 if k.endswith(LORA_B))  # peft's initialisation: B = 0, A random
    assert all(np.abs(a0[k]).max() > 0 for k in a0 if k.endswith(LORA_A))
    start = {_key(n): p.detach().numpy().copy() for n, p in lora_params.items()}
    state = state.replace(params=jax.device_put(start), opt_state=ts.tx.init(jax.device_put(start)))
    frozen0 = jax.device_get(state.frozen)
    assert sorted(frozen0) == sorted(flatten_params(jax_pipe.params["unet"]))  # the whole UNet frozen
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) >= 1]
    assert sum(np.size(x) for x in opt_arrays) == 2 * sum(np.size(v) for v in start.values())  # mu, nu: adapter

    cond = _cond(0)
    ref = torch_edm_loss(model, **cond)
    ref.backward()
    loss, grads = jax.jit(jax.value_and_grad(ts.loss))(state.params, state.frozen, cond)
    assert rel_err(loss, ref.detach().numpy()) <= 1e-5
    ref_grads = {_key(n): p.grad.numpy() for n, p in lora_params.items()}
    # cross-attention over one CLIP token: softmax over one key is 1, so attn2's to_q / to_k adapters get no
    # gradient in exact arithmetic (float noise in both frameworks): those must stay noise, the rest match
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    zero = [k for k, g in ref_grads.items() if np.abs(g).max() <= 1e-6 * scale]
    assert all(".attn2.to_q" in k or ".attn2.to_k" in k for k in zero), zero
    assert all(np.abs(grads[k]).max() <= 1e-6 * scale for k in zero)
    live = [k for k in ref_grads if k not in zero]
    assert len(live) > len(ref_grads) / 2
    worst = max((rel_err(grads[k], ref_grads[k]), k) for k in live)
    assert worst[0] <= 1e-4, worst

    opt = torch.optim.AdamW(lora_params.values(), lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    update = jax.jit(ts.update)
    norms = []
    for i in range(3):
        opt.zero_grad()
        torch_edm_loss(model, **_cond(i)).backward()
        grads = {_key(n): p.grad.numpy().copy() for n, p in lora_params.items()}
        state = update(state, grads)
        norms.append(float(torch.nn.utils.clip_grad_norm_(lora_params.values(), clip)))
        opt.step()
    assert min(norms) > 2 * clip, norms  # the clipping acted
    got = jax.device_get(state.params)
    assert max(np.abs(p.detach().numpy() - start[_key(n)]).max() for n, p in lora_params.items()) > lr / 2
    for n, p in lora_params.items():  # each leaf's error against its own movement (+ a few ulps, as for AdamW)
        ref_p, moved = p.detach().numpy(), p.detach().numpy() - start[_key(n)]
        err = np.abs(got[_key(n)] - ref_p).max()
        assert err <= 1e-5 * np.abs(moved).max() + 8 * np.spacing(np.abs(ref_p).max()), (n, err)
    frozen1 = jax.device_get(state.frozen)
    assert all(np.array_equal(frozen1[k], frozen0[k]) for k in frozen0)
    # the adapter as a LoRA: the trained params fused into the base are apply_lora's
    lora = ts.trained_lora(state)
    assert {lora.scaling(m) for m in lora.weights} == {ALPHA / R}
    fused, ref_fused = jax.device_get((ts.trained_params(state), apply_lora(jax_pipe.params["unet"], lora)))
    for u, v in zip(jax.tree.leaves(fused), jax.tree.leaves(ref_fused)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_lora_settings_are_checked(jax_pipe):
    with pytest.raises(TrainConfigError, match="lora_rank must be a positive int"):
        _config(trainable="lora", lora_rank=0)
    with pytest.raises(TrainConfigError, match="lora_targets must be a tuple"):
        _config(trainable="lora", lora_targets="to_q")
    with pytest.raises(TrainConfigError, match="lora_alpha must be a positive number"):
        _config(trainable="lora", lora_alpha=-1.0)
    from svd_jax.lora import LoRAError

    ts = TrainStep(jax_pipe.unet, None, None, _config(trainable="lora", lora_targets=("to_q", "to_qq")))
    with pytest.raises(LoRAError, match=r"targets \['to_qq'\] match no linear layer"):
        ts.init(jax_pipe.params["unet"])
    assert "lora_rank" not in _config().fingerprint()  # other runs' checkpoints do not depend on LoRA settings
    assert _config(trainable="lora").fingerprint()["lora_targets"] == list(DEFAULT_TARGETS)


@pytest.mark.slow  # two CLI runs and a generation with the adapter: minutes on 2 cores
def test_lora_training_run_lowers_the_loss_and_exports_an_adapter(tiny_pipeline, videos, tmp_path):
    base, out = tiny_pipeline[1], tmp_path / "lora_run"
    args = _args(base, videos, out, 30, "--lora-rank", "4", "--lora-alpha", "4", "--lora-targets", "to_q", "to_k",
                 "to_v", "to_out.0", "ff.net.2", "--export-fused", "--save-every", "15")
    args[args.index("--trainable") + 1] = "lora"
    args[args.index("--learning-rate") + 1] = "3e-2"
    assert main(args) == 0
    assert [m["step"] for m in _metrics(out)] == list(range(1, 31))
    lora = load_lora(out)  # the peft folder in the run's folder
    assert {lora.rank(m) for m in lora.weights} == {4} and any(m.endswith("ff.net.2") for m in lora.weights)
    from svd_jax import StableVideoDiffusionPipeline
    from svd_jax.models import UNetSpatioTemporalConditionModel
    from svd_jax.training.data import ClipLoader, VideoClipDataset

    unet, before = UNetSpatioTemporalConditionModel.from_pretrained(base, subfolder="unet")
    _, exported = UNetSpatioTemporalConditionModel.from_pretrained(out, subfolder="unet")
    fused = apply_lora(before, lora)
    for u, v in zip(jax.tree.leaves(exported), jax.tree.leaves(fused)):  # the fused export is base + adapter
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
    pipe = StableVideoDiffusionPipeline.from_pretrained(base, dtype="float32")
    step = TrainStep(unet, pipe.vae, pipe.image_encoder,
                     TrainConfig(num_frames=RUN_F, height=RUN_H, width=RUN_W, batch_size=4))
    ds = VideoClipDataset(videos, RUN_F, RUN_H, RUN_W, warn=False)
    with ClipLoader(ds, 4, seed=99, prefetch=0) as loader:
        batches = [next(loader) for _ in range(4)]
    enc = {k: pipe.params[k] for k in ("vae", "image_encoder")}
    l0, l1 = _eval_loss(step, before, batches, enc), _eval_loss(step, fused, batches, enc)
    print(f"LoRA eval loss before {l0:.4f} after {l1:.4f} ({l1 / l0:.2f}x)")
    assert l1 < 0.9 * l0, (l0, l1)
    # the adapter in generation: the CLI with --lora equals the pipeline with the exported fused UNet
    import PIL.Image

    image = tmp_path / "first.png"
    PIL.Image.new("RGB", (RUN_W, RUN_H), (120, 30, 200)).save(image)
    video = tmp_path / "v.gif"
    assert main(["generate", "--model", str(base), "--image", str(image), "--output", str(video), "--height",
                 str(RUN_H), "--width", str(RUN_W), "--num-frames", str(RUN_F), "--steps", "2", "--lora",
                 f"{out}:1.0", "--quiet"]) == 0
    assert video.stat().st_size > 0
