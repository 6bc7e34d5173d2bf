"""The train step (svd_jax/training/step.py) against the PyTorch reference: AdamW updates equal torch.optim.AdamW
on the EDM objective of diffusers' UNet, the step's conditioning equals diffusers' VAE/CLIP, remat policies give
the same gradients, a temporal-only run leaves every other weight untouched and holds no state for it."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.options import REMAT_POLICIES
from svd_jax.training import TrainConfig, TrainStep
from svd_jax.training.config import TEMPORAL_MARKERS, TrainConfigError
from svd_jax.training.step import diffusers_name, flatten_params, trainable_keys
from svd_jax.weights import load_params, params_to_torch_state
from conftest import TINY_PIPE_CLIP, rel_err, torch_edm_loss

B, F, H, W = 2, 3, 16, 24  # pixels; latents 2 x 3 x 2 x 3
D = TINY_PIPE_CLIP["projection_dim"]


@pytest.fixture(scope="module")
def jax_pipe(tiny_pipeline):
    return StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline[1], dtype="float32")


def _config(**kw):
    return TrainConfig(**{**dict(num_frames=F, height=H, width=W, batch_size=B, max_steps=10), **kw})


def _cond(seed):
    rng = np.random.default_rng(seed)
    h, w = H // 8, W // 8
    return dict(x0=rng.normal(size=(B, F, h, w, 4)).astype(np.float32),
                image_latents=rng.normal(size=(B, h, w, 4)).astype(np.float32),
                image_embeds=rng.normal(size=(B, 1, D)).astype(np.float32),
                added_time_ids=np.array([[6, 127, 0.02], [3, 30, 0.3]], np.float32),
                sigma=np.array([0.6, 3.5], np.float32),
                noise=rng.normal(size=(B, F, h, w, 4)).astype(np.float32))


def _latent_batch(seed, b=B):
    rng = np.random.default_rng(seed)
    return dict(latents=rng.normal(size=(b, F, H // 8, W // 8, 4)).astype(np.float32),
                first_frame=rng.uniform(-1, 1, (b, H, W, 3)).astype(np.float32),
                image_embeds=rng.normal(size=(b, 1, D)).astype(np.float32),
                fps=np.full((b,), 7, np.float32), motion_bucket_id=np.full((b,), 127, np.float32))


def _encoders(pipe):
    return {"vae": pipe.params["vae"], "image_encoder": pipe.params["image_encoder"]}


def test_adamw_steps_equal_torch_adamw(tiny_pipeline, jax_pipe):
    """Three updates of the step's optimizer (warmup schedule, decoupled weight decay, active global-norm
    clipping) equal torch.optim.AdamW + clip_grad_norm_ + LambdaLR on diffusers' UNet, for every parameter.

    Both optimizers get the same gradients (torch autograd of the EDM loss, converted to the Flax layout; the JAX
    gradients equal them, tests/test_training_loss.py): Adam divides each element by its own gradient's size, so
    two independently rounded gradients would give different updates wherever an element's gradient is float
    noise, whatever the optimizer."""
    lr, wd, clip, warmup = 2e-3, 0.05, 0.05, 2
    cfg = _config(learning_rate=lr, weight_decay=wd, adam_b1=0.8, adam_b2=0.95, adam_eps=1e-6, max_grad_norm=clip,
                  warmup_steps=warmup)
    ts = TrainStep(jax_pipe.unet, None, None, cfg)
    state = ts.init(jax_pipe.params["unet"])
    before = params_to_torch_state(jax.device_get(ts.trained_params(state)))
    abstract = jax_pipe.unet.init_params_abstract()

    model = copy.deepcopy(tiny_pipeline[0].unet).float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: min(1.0, (u + 1) / warmup))
    update = jax.jit(ts.update)
    norms = []
    for i in range(3):
        opt.zero_grad()
        torch_edm_loss(model, **_cond(i)).backward()
        # copies: clip_grad_norm_ below scales the grads in place, and jax may alias a numpy buffer on CPU
        torch_grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        grads = flatten_params(load_params(abstract, torch_grads))
        state = update(state, grads)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        sched.step()
    assert min(norms) > 2 * clip, norms  # the clipping really acted
    got = params_to_torch_state(jax.device_get(ts.trained_params(state)))
    ref = {k: p.detach().numpy() for k, p in model.named_parameters()}
    assert set(got) == set(ref)
    moved = {k: ref[k] - before[k] for k in ref}
    assert max(float(np.abs(m).max()) for m in moved.values()) > lr  # the weights really moved
    # Each leaf's error against its own movement, plus a few float32 ulps of the weights: the two libraries round
    # p - lr (adam + wd p) and p (1 - lr wd) - lr adam differently by an ulp of p, which for a leaf that barely
    # moves is a large fraction of its movement.
    excess = {k: float(np.abs(got[k] - ref[k]).max()) / (1e-5 * float(np.abs(moved[k]).max())
                                                           + 8 * float(np.spacing(np.abs(ref[k]).max())))
              for k in ref}
    worst = max((v, k) for k, v in excess.items())
    assert worst[0] <= 1.0, worst
    assert int(state.step) == 3


def test_conditioning_equals_diffusers_encoders(tiny_pipeline, jax_pipe):
    """The step's latents (every frame's VAE posterior mode x scaling_factor), conditioning latents (the
    noise-augmented first frame's, unscaled), CLIP embedding (of the clean first frame, resized the pipeline's way)
    and added time ids equal diffusers' components on the same pixels and draws."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    pipe = tiny_pipeline[0]
    ts = TrainStep(jax_pipe.unet, jax_pipe.vae, jax_pipe.image_encoder, _config(drop_embedding=0.0, drop_image=0.0,
                                                                               drop_both=0.0))
    rng = np.random.default_rng(3)
    batch = dict(pixels=rng.uniform(-1, 1, (B, F, H, W, 3)).astype(np.float32),
                 fps=np.array([7, 12], np.float32), motion_bucket_id=np.array([127, 40], np.float32))
    cond, draws = jax.jit(ts.conditioning)(jax.random.PRNGKey(5), batch, _encoders(jax_pipe))
    nchw = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2)
    with torch.no_grad():
        frames = nchw(batch["pixels"].reshape(B * F, H, W, 3))
        x0 = pipe.vae.encode(frames).latent_dist.mode() * pipe.vae.config.scaling_factor
        aug = np.asarray(cond["added_time_ids"])[:, 2]
        first = nchw(batch["pixels"][:, 0] + aug[:, None, None, None] * np.asarray(draws["aug_noise"]))
        z = pipe.vae.encode(first).latent_dist.mode()
        img = _resize_with_antialiasing(nchw(batch["pixels"][:, 0]), (224, 224))
        pix = pipe.feature_extractor(images=(img + 1) / 2, do_normalize=True, do_center_crop=False,
                                     do_resize=False, do_rescale=False, return_tensors="pt").pixel_values
        emb = pipe.image_encoder(pix).image_embeds
    assert rel_err(cond["x0"], x0.permute(0, 2, 3, 1).reshape(B, F, H // 8, W // 8, 4).numpy()) <= 1e-5
    assert rel_err(cond["image_latents"], z.permute(0, 2, 3, 1).numpy()) <= 1e-5
    assert rel_err(cond["image_embeds"][:, 0], emb.numpy()) <= 1e-4
    np.testing.assert_allclose(np.asarray(cond["added_time_ids"])[:, :2], [[6, 127], [11, 40]])
    assert np.all(aug > 0) and np.all(np.asarray(cond["sigma"]) > 0)


def test_conditioning_draws_follow_the_configured_distributions(jax_pipe):
    """Over 4096 clips: ln sigma ~ N(0.7, 1.6), ln noise_aug ~ N(-3, 0.5), the embedding dropped 20 %, the image
    latents 20 %, both 10 % (the defaults), and a custom setting moves them."""
    n, h, w = 4096, 8, 8

    def stats(cfg):
        ts = TrainStep(jax_pipe.unet, jax_pipe.vae, None, cfg)
        rng = np.random.default_rng(0)
        batch = dict(latents=np.zeros((n, 1, 1, 1, 4), np.float32),
                     first_frame=rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32),
                     image_embeds=np.ones((n, 1, D), np.float32), fps=np.full((n,), 7, np.float32),
                     motion_bucket_id=np.full((n,), 127, np.float32))
        _, draws = jax.jit(ts.conditioning)(jax.random.PRNGKey(1), batch, _encoders(jax_pipe))
        cond, _ = jax.jit(ts.conditioning)(jax.random.PRNGKey(1), batch, _encoders(jax_pipe))
        ke, ki = np.asarray(draws["keep_embedding"]), np.asarray(draws["keep_image"])
        dropped_emb = np.all(np.asarray(cond["image_embeds"]) == 0, axis=(1, 2))
        assert np.array_equal(dropped_emb, ke == 0)
        ls, la = np.log(np.asarray(cond["sigma"])), np.log(np.asarray(cond["added_time_ids"])[:, 2])
        return (1 - ke).mean(), (1 - ki).mean(), ((1 - ke) * (1 - ki)).mean(), ls.mean(), ls.std(), la.mean(), \
            la.std()

    cfg = TrainConfig(num_frames=1, height=h, width=w, batch_size=n)
    e, i, both, ms, ss, ma, sa = stats(cfg)
    tol = 4 * np.sqrt(0.25 / n)
    assert abs(e - 0.2) < tol and abs(i - 0.2) < tol and abs(both - 0.1) < tol, (e, i, both)
    assert abs(ms - 0.7) < 0.1 and abs(ss - 1.6) < 0.1 and abs(ma + 3.0) < 0.05 and abs(sa - 0.5) < 0.05
    e, i, both, ms, *_ = stats(cfg.replace(drop_embedding=0.5, drop_image=0.3, drop_both=0.3, p_mean=-1.2))
    assert abs(e - 0.5) < tol and abs(i - 0.3) < tol and abs(both - 0.3) < tol and abs(ms + 1.2) < 0.1


def _residual_bytes(fn, *args) -> int:
    """Bytes of the arrays JAX's autodiff keeps from fn's forward for its backward (the vjp's residuals)."""
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1])(*args).jaxpr
    ins = {id(v) for v in jaxpr.invars}
    outs = {id(v): v for v in jaxpr.outvars if type(v).__name__ != "Literal" and id(v) not in ins}
    return sum(int(np.prod(v.aval.shape)) * np.dtype(v.aval.dtype).itemsize for v in outs.values())


@pytest.mark.slow  # ~5 min on 2 cores: seven policies traced, three compiled, one eager run
def test_remat_policies_give_the_same_gradients(jax_pipe):
    """Recomputation changes what is kept, not the math: every policy's gradients equal remat="none"'s to within
    the float32 noise of XLA:CPU itself (the same "none" gradients compiled vs run op by op differ by ~2e-5 of
    their scale in the conv kernels, from convolution algorithms and fusion; measured here, not assumed)."""
    cond = _cond(4)
    grads, saved, steps = {}, {}, {}
    for policy in REMAT_POLICIES:
        ts = steps[policy] = TrainStep(jax_pipe.unet, None, None, _config(remat=policy))
        state = ts.init(jax_pipe.params["unet"])
        saved[policy] = _residual_bytes(lambda p: ts.loss(p, state.frozen, cond), state.params)
        if policy in ("none", "layers", "blocks+transformers+layers"):  # the nested one applies every wrapper
            grads[policy] = jax.device_get(jax.jit(jax.grad(ts.loss))(state.params, state.frozen, cond))
    state = steps["none"].init(jax_pipe.params["unet"])
    with jax.disable_jit():
        eager = jax.device_get(jax.grad(steps["none"].loss)(state.params, state.frozen, cond))
    diff = lambda a, b: max(float(np.abs(a[k] - b[k]).max()) for k in a)
    scale = max(float(np.abs(g).max()) for g in grads["none"].values())
    floor = diff(grads["none"], eager)
    assert floor <= 1e-4 * scale, (floor, scale)  # the noise floor itself is small
    for policy in ("layers", "blocks+transformers+layers"):
        worst = diff(grads[policy], grads["none"])
        assert worst <= max(4 * floor, 1e-6 * scale), (policy, worst, floor, scale)
    # each granularity really keeps less: recomputation is in the program, not only promised
    for less, more in (("blocks", "none"), ("transformers", "none"), ("layers", "none"),
                       ("transformers+layers", "transformers"), ("blocks+layers", "blocks")):
        assert saved[less] < saved[more], (less, saved[less], more, saved[more])


@pytest.mark.slow  # > 1 min on 2 cores; CI runs it after the README command
def test_temporal_training_touches_only_temporal_layers(jax_pipe):
    """trainable="temporal": exactly the temporal layers train; after two steps every other weight is
    bit-identical and has no optimizer state or gradient accumulator; EMA follows the updates."""
    cfg = _config(trainable="temporal", learning_rate=1e-2, ema_decay=0.5, grad_accum_steps=2)
    ts = TrainStep(jax_pipe.unet, jax_pipe.vae, None, cfg)
    flat = flatten_params(jax_pipe.params["unet"])
    keys = trainable_keys(flat, "temporal")
    names = {k: diffusers_name(k, np.ndim(v)) for k, v in flat.items()}
    assert all(any(m in names[k] for m in TEMPORAL_MARKERS) for k in keys)
    assert all(not any(m in names[k] for m in TEMPORAL_MARKERS) for k in set(flat) - set(keys))
    assert 0 < len(keys) < len(flat)
    state = ts.init(jax_pipe.params["unet"])
    assert sorted(state.params) == keys and sorted(state.frozen) == sorted(set(flat) - set(keys))
    opt_leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    big = [x for _, x in opt_leaves if np.ndim(x) >= 1]  # every array but the scalar counters
    assert sum(np.size(x) for x in big) == 3 * sum(np.size(flat[k]) for k in keys)  # mu, nu, accumulator
    frozen0 = jax.device_get(state.frozen)
    params0 = jax.device_get(state.params)
    enc = _encoders(jax_pipe)
    state, _ = ts(state, _latent_batch(0), enc)
    mid = jax.device_get(state.params)
    assert all(np.array_equal(mid[k], params0[k]) for k in keys)  # first of 2 micro-steps: no update yet
    state, m = ts(state, _latent_batch(1), enc)
    after, frozen1, ema = jax.device_get((state.params, state.frozen, state.ema))
    assert all(np.array_equal(frozen1[k], frozen0[k]) for k in frozen0)
    changed = [k for k in keys if not np.array_equal(after[k], params0[k])]
    assert len(changed) > 0.9 * len(keys)
    for k in changed[:20]:
        np.testing.assert_allclose(ema[k], 0.5 * params0[k] + 0.5 * after[k], rtol=1e-6, atol=1e-7)
    assert int(state.step) == 2 and np.isfinite(float(m["loss"]))


def test_bad_settings_and_batches_are_refused(jax_pipe):
    with pytest.raises(TrainConfigError, match="height=20 is not a multiple of the VAE's factor 8"):
        _config(height=20)
    with pytest.raises(TrainConfigError, match="trainable must be one of"):
        _config(trainable="attention")
    with pytest.raises(TrainConfigError, match="drop_both"):
        _config(drop_both=0.5)
    with pytest.raises(TrainConfigError, match="selects no parameter"):
        TrainStep(jax_pipe.unet, None, None, _config(trainable=lambda n: False)).init(jax_pipe.params["unet"])
    ts = TrainStep(jax_pipe.unet, jax_pipe.vae, None, _config())
    state = ts.init(jax_pipe.params["unet"])
    bad = _latent_batch(0)
    bad["latents"] = bad["latents"][:, :2]
    with pytest.raises(ValueError, match=r"batch\['latents'\] has shape .*this run expects .*num_frames=3"):
        ts(state, bad, _encoders(jax_pipe))
    with pytest.raises(ValueError, match="missing"):
        ts(state, {"fps": bad["fps"], "motion_bucket_id": bad["fps"]}, _encoders(jax_pipe))
    assert jnp.asarray(state.step) == 0
