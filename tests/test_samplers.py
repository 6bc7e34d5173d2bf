"""The EDM samplers (svd_jax/samplers.py) against diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler:
the schedules, every step of the multistep update on random model outputs (orders 1-3, midpoint/heun, both sigma
schedules and final sigmas, 1-16 steps), and whole generations equal diffusers' StableVideoDiffusionPipeline
running that scheduler (fp32, tiny weights)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler as RefDPM
from diffusers import EDMEulerScheduler as RefEuler
from diffusers import StableVideoDiffusionPipeline as RefPipeline
from test_pipeline import F, H, W, _image, _reference

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.samplers import (
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    make_scheduler,
    multistep_update,
)
from svd_jax.scheduler import EulerScheduler
from conftest import rel_err

SVD = dict(sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, prediction_type="v_prediction")


def _ref(cls, **cfg):
    return cls(**{**SVD, **cfg})


@pytest.mark.parametrize("n", [1, 2, 5, 14, 25])
@pytest.mark.parametrize("schedule,final", [("karras", "zero"), ("exponential", "sigma_min")])
def test_schedules_equal_diffusers(n, schedule, final):
    for ours, theirs in ((EDMEulerScheduler, RefEuler), (EDMDPMSolverMultistepScheduler, RefDPM)):
        cfg = dict(sigma_schedule=schedule, final_sigmas_type=final)
        s = ours(**cfg).set_timesteps(n)
        ref = _ref(theirs, **cfg)
        ref.set_timesteps(n)
        np.testing.assert_allclose(s.sigmas, ref.sigmas.numpy(), rtol=2e-7, err_msg=ours.__name__)
        np.testing.assert_allclose(s.timesteps, ref.timesteps.numpy(), rtol=2e-7, atol=1e-7)
        assert s.init_noise_sigma == ref.init_noise_sigma


CONFIGS = [dict(solver_order=o, solver_type=t, sigma_schedule=sc, final_sigmas_type=fi, lower_order_final=lo)
           for o, t, sc, fi, lo in itertools.product((1, 2, 3), ("midpoint", "heun"), ("karras", "exponential"),
                                                     ("zero", "sigma_min"), (True, False))
           if not (o == 1 and t == "heun")]


@pytest.mark.parametrize("n", [1, 3, 6, 16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_multistep_updates_equal_diffusers(cfg, n):
    """Drive diffusers' scheduler and ours with the same random model outputs (v-prediction, the model's
    output depends on the sample so an error would propagate): every step's sample agrees."""
    ours = EDMDPMSolverMultistepScheduler(**cfg)
    ref = _ref(RefDPM, **cfg)
    ref.set_timesteps(n)
    sched = ours.set_timesteps(n)
    coefs = ours.coefficients(sched.sigmas)
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((2, 3, 4, 5)) * sched.init_noise_sigma).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    hist = jnp.zeros((ours.solver_order - 1,) + x.shape, jnp.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    x_prev = x
    for i, t in enumerate(ref.timesteps):
        v = np.tanh(np.asarray(x) * 0.01 + w * (i + 1) * 0.3).astype(np.float32)  # a "model" of the sample
        x_ref = ref.step(torch.from_numpy(v), t, x_ref).prev_sample
        x, hist = multistep_update(v, x, hist, sched.sigmas[i], coefs[i])
        if not torch.isfinite(x_ref).all():  # diffusers' heun step from sigma_min to sigma_min: 0 / 0 in float32
            assert abs(sched.sigmas[i] / sched.sigmas[i + 1] - 1) < 1e-6, (i, cfg)
            assert np.abs(np.asarray(x) - x_prev).max() <= 1e-5 * np.abs(x_prev).max(), "a null step moves nothing"
            break
        x_prev = x
        scale = float(np.abs(x_ref.numpy()).max())
        assert float(np.abs(np.asarray(x) - x_ref.numpy()).max()) <= 2e-6 * max(scale, 1.0), (i, cfg)
        x = np.asarray(x)


def test_orders_follow_diffusers_rules():
    two = EDMDPMSolverMultistepScheduler()
    assert two.orders(1) == [1] and two.orders(4) == [1, 2, 2, 1]
    three = EDMDPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min")
    assert three.orders(6) == [1, 2, 3, 3, 2, 1]  # lower_order_final below 15 steps: 2nd, then 1st at the end
    assert three.orders(16)[-3:] == [3, 3, 3]
    assert EDMDPMSolverMultistepScheduler(solver_order=3).orders(16)[-1] == 1  # final sigma 0: always 1st order


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="sigma_data=0.5 is not supported"):
        EDMEulerScheduler(sigma_data=0.5)
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver"):
        EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="solver_order=4"):
        EDMDPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="thresholding=True"):
        EDMDPMSolverMultistepScheduler(thresholding=True)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        EDMDPMSolverMultistepScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="explicit sigmas are not supported"):
        EDMEulerScheduler().set_timesteps(sigmas=[3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="scheduler must be one of"):
        make_scheduler("ddim")
    # SVD's Euler config carries over its bounds and prediction type; diffusers-named overrides apply
    base = EulerScheduler(sigma_min=0.01, sigma_max=500.0, prediction_type="v_prediction")
    dpm = make_scheduler("edm_dpmsolver++", base, {"solver_order": 3, "sigma_schedule": "exponential"})
    assert (dpm.sigma_min, dpm.sigma_max, dpm.solver_order, dpm.sigma_schedule) == (0.01, 500.0, 3, "exponential")


CASES = [
    ("edm_euler", {}, dict(num_inference_steps=4)),
    ("edm_dpmsolver++", {}, dict(num_inference_steps=3)),
    ("edm_dpmsolver++", {}, dict(num_inference_steps=6)),
    ("edm_dpmsolver++", {}, dict(num_inference_steps=5, max_guidance_scale=1.0)),  # CFG off
    ("edm_dpmsolver++", dict(solver_order=3, solver_type="heun", sigma_schedule="exponential",
                             final_sigmas_type="sigma_min"), dict(num_inference_steps=6)),
]


@pytest.mark.parametrize("name,overrides,kw", CASES, ids=lambda v: str(v))
def test_generation_equals_diffusers_with_that_scheduler(tiny_pipeline, name, overrides, kw):
    ref, folder = tiny_pipeline
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder, scheduler=name, scheduler_config=overrides)
    cls = RefEuler if name == "edm_euler" else RefDPM
    ref2 = RefPipeline(**{**ref.components, "scheduler": _ref(cls, **overrides)})
    image = _image()
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (1, F, H // 8, W // 8, 4)))
    out = pipe(image, height=H, width=W, num_frames=F, seed=5, latents=latents, output_type="np", **kw).frames
    expected = _reference(ref2, image, 5, latents, **kw)
    print(f"{name} {overrides} {kw}: max abs diff vs diffusers {np.abs(out - expected).max():.2e}")
    assert rel_err(out, expected) <= 1e-4


def test_multistep_stepwise_and_a_replaced_scheduler(tiny_pipeline):
    """progress=True (one program per step, the solver history carried between them) equals the one-program
    generation; assigning pipe.scheduler switches the sampler for the next call."""
    _, folder = tiny_pipeline
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    image = _image()
    kw = dict(height=H, width=W, num_frames=F, seed=5, num_inference_steps=4, output_type="latent")
    euler = np.asarray(pipe(image, **kw).frames)
    pipe.scheduler = EDMDPMSolverMultistepScheduler(solver_order=3)
    one = np.asarray(pipe(image, **kw).frames)
    stepwise = np.asarray(pipe(image, progress=True, **kw).frames)
    assert rel_err(stepwise, one) <= 1e-5
    assert rel_err(one, euler) > 1e-3  # another sampler, another result


def test_step_callbacks(tiny_pipeline):
    """callback_on_step_end: called on the host in step order every k steps and after the last, with the noise
    level and the latents (the last ones are the output); one program for any function; the stepwise path too."""
    _, folder = tiny_pipeline
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder, scheduler="edm_dpmsolver++")
    image = _image()
    kw = dict(height=H, width=W, num_frames=F, seed=5, num_inference_steps=5, output_type="latent")
    plain = np.asarray(pipe(image, **kw).frames)
    seen = []
    out = pipe(image, callback_on_step_end=lambda i, s, lat: seen.append((i, s, lat.copy())), callback_steps=2,
               **kw).frames
    sigmas = pipe.scheduler.set_timesteps(5).sigmas
    assert [i for i, _, _ in seen] == [1, 3, 4]
    assert [s for _, s, _ in seen] == [float(sigmas[i + 1]) for i in (1, 3, 4)]
    assert isinstance(seen[-1][2], np.ndarray) and seen[-1][2].shape == plain.shape
    np.testing.assert_array_equal(seen[-1][2], np.asarray(out))
    assert rel_err(np.asarray(out), plain) <= 1e-6  # the callback observes, it changes nothing
    count = pipe.trace_count
    other = []
    pipe(image, callback_on_step_end=lambda i, s, lat: other.append(i), callback_steps=2, **kw)
    assert other == [1, 3, 4] and pipe.trace_count == count  # a new function, the same program
    stepwise = []
    pipe(image, progress=True, callback_on_step_end=lambda i, s, lat: stepwise.append((i, s)), **kw)
    assert [i for i, _ in stepwise] == [0, 1, 2, 3, 4] and stepwise[-1][1] == float(sigmas[5])

    def boom(i, s, lat):
        raise RuntimeError("stop here")

    with pytest.raises(Exception, match="stop here"):
        pipe(image, callback_on_step_end=boom, **kw)
    with pytest.raises(ValueError, match="callback_on_step_end must be a function"):
        pipe(image, callback_on_step_end=3, **kw)
    with pytest.raises(ValueError, match="callback_steps must be a positive integer"):
        pipe(image, callback_on_step_end=boom, callback_steps=0, **kw)
