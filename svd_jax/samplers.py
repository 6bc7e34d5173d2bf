"""EDM samplers for SVD, equal to diffusers' ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler``.

Like :mod:`svd_jax.scheduler` (today's Euler), each scheduler is a frozen config that builds the whole schedule
on the host (:meth:`set_timesteps` -> :class:`~svd_jax.scheduler.EulerSchedule`: ``sigmas`` (N+1,),
``timesteps`` (N,) = ``0.25 * ln(sigma)``, ``init_noise_sigma`` = ``sqrt(sigma_max^2 + 1)``); the per-step maths
are pure ``jax.numpy`` functions that run inside the denoising ``lax.scan``.

* :class:`EDMEulerScheduler`: the deterministic Euler step of the EDM formulation. With ``sigma_data = 1`` (SVD)
  its preconditioning is the one :func:`svd_jax.scheduler.step` computes, so the step is that function; only the
  sigmas differ (``sigma_schedule`` "karras" (rho) or "exponential", ``final_sigmas_type``).
* :class:`EDMDPMSolverMultistepScheduler`: DPM-Solver++ (Lu et al.) of order 1, 2 (2M, the default) or 3 in
  the data-prediction form, ``solver_type`` "midpoint" or "heun", ``lower_order_final`` / ``euler_at_final`` and
  diffusers' order rules (first order at the first step and, with ``final_sigmas_type="zero"``, at the last).
  Each step is linear in the current sample and the last ``solver_order`` denoised predictions:
  ``x_{i+1} = a_i x_i + sum_j c_ij D_{i-j}``; the coefficients (N, 1 + solver_order) are computed on the host
  in float64 from the sigmas (:meth:`~EDMDPMSolverMultistepScheduler.coefficients`) and the previous
  predictions travel in the scan's carry (:func:`multistep_update`).

Both are configured for SVD by default (``sigma_min`` 0.002, ``sigma_max`` 700, ``sigma_data`` 1,
``prediction_type`` "v_prediction"): diffusers' own defaults (sigma_max 80, sigma_data 0.5, epsilon) describe
other models. Not supported (a ``ValueError`` names the option): ``sigma_data`` other than 1 (SVD's UNet is
preconditioned with 1), ``algorithm_type="sde-dpmsolver++"`` and stochastic Euler churn (the generation is
deterministic given its noise), ``thresholding``, ``prediction_type="sample"``, and explicit ``sigmas`` (diffusers'
EDM schedulers read them as positions on the sigma ramp, not as noise levels).

One deliberate difference: with ``final_sigmas_type="sigma_min"`` the ramp already ends at sigma_min, so the last
step goes from sigma_min to sigma_min (to within an ulp): here it leaves the sample (all but) unchanged, where
diffusers' heun and third-order updates (15 steps or more, or ``lower_order_final=False``) take float32 logs of the
two, gets a step of exactly zero, so it divides zero by zero and returns NaN (the coefficients here are float64).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .options import SCHEDULER_NAMES
from .scheduler import EulerSchedule, _readonly, _torch_linspace_f32

SIGMA_SCHEDULES = ("karras", "exponential")
EDM_PREDICTION_TYPES = ("v_prediction", "epsilon")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# keys of SVD's EulerDiscreteScheduler config (and other diffusers configs) that mean nothing to these samplers
_IGNORED = frozenset({
    "beta_start", "beta_end", "beta_schedule", "trained_betas", "interpolation_type", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing", "timestep_type", "steps_offset",
    "rescale_betas_zero_snr", "clip_sample", "set_alpha_to_one", "skip_prk_steps", "sample_max_value",
    "dynamic_thresholding_ratio", "variance_type", "timestep_values", "use_lu_lambdas", "lambda_min_clipped",
    "predict_x0", "noise_sampler_seed",
})


def _check(cls: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{cls}: {name}={value!r} is not supported; supported values: "
                         f"{', '.join(repr(a) for a in allowed)}")


@dataclasses.dataclass(frozen=True)
class _EDMBase:
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    sigma_data: float = 1.0
    sigma_schedule: str = "karras"
    num_train_timesteps: int = 1000
    prediction_type: str = "v_prediction"
    rho: float = 7.0
    final_sigmas_type: str = "zero"

    kind = "euler"  # how the pipeline runs a step: "euler" (svd_jax.scheduler.step) or "multistep"

    def __post_init__(self):
        name = type(self).__name__
        _check(name, "sigma_schedule", self.sigma_schedule, SIGMA_SCHEDULES)
        _check(name, "prediction_type", self.prediction_type, EDM_PREDICTION_TYPES)
        _check(name, "final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if float(self.sigma_data) != 1.0:
            raise ValueError(f"{name}: sigma_data={self.sigma_data!r} is not supported; SVD's UNet is "
                             f"preconditioned with sigma_data=1.0")
        for key in ("sigma_min", "sigma_max", "rho"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: {key} must be a finite positive number; got {v!r}")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"{name}: sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides):
        """Build from a diffusers scheduler config (keys of this class's fields; SVD's EulerDiscreteScheduler
        config works: its sigma_min, sigma_max, prediction_type and num_train_timesteps carry over, the rest is
        ignored) with ``overrides`` on top. Unknown keys warn, as in diffusers; unsupported values raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in {**dict(config or {}), **overrides}.items():
            if key in fields:
                kwargs[key] = value
            elif not key.startswith("_") and key not in _IGNORED:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown scheduler config keys {sorted(unknown)}", stacklevel=2)
        for key in ("sigma_min", "sigma_max", "sigma_data", "rho"):
            if isinstance(kwargs.get(key), (int, np.integer)) and not isinstance(kwargs[key], bool):
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    @property
    def init_noise_sigma(self) -> float:
        """diffusers': ``(sigma_max^2 + 1) ** 0.5``."""
        return (self.sigma_max ** 2 + 1) ** 0.5

    def _ramp_sigmas(self, n: int) -> np.ndarray:  # pragma: no cover - defined by the subclasses
        raise NotImplementedError

    def _final_sigma(self, sigmas: np.ndarray) -> float:  # pragma: no cover
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int | None = None, sigmas=None) -> EulerSchedule:
        """The schedule of ``num_inference_steps`` (N >= 1) steps: sigmas (N+1,) float32 with the final value
        appended, timesteps (N,) float32 ``0.25 * ln(sigma)``, ``init_noise_sigma``."""
        name = type(self).__name__
        if sigmas is not None:
            raise ValueError(f"{name}: explicit sigmas are not supported (diffusers' EDM schedulers read them as "
                             "positions on the sigma ramp); pass num_inference_steps, or use the 'euler' scheduler")
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be an int >= 1, got {n!r}")
        sig = self._ramp_sigmas(int(n)).astype(np.float32)
        timesteps = np.log(sig.astype(np.float64)).astype(np.float32) * np.float32(0.25)
        full = np.concatenate([sig, np.asarray([self._final_sigma(sig)], np.float32)]).astype(np.float32)
        return EulerSchedule(sigmas=_readonly(full), timesteps=_readonly(timesteps),
                             init_noise_sigma=self.init_noise_sigma)

    def _karras(self):
        min_inv, max_inv = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return min_inv, max_inv

    def _exponential_f32(self, n: int) -> np.ndarray:
        """diffusers: ``torch.linspace(log(sigma_min), log(sigma_max), n).exp().flip(0)`` in float32 (torch's
        float32 exp is the correctly rounded one here, numpy's float32 exp is 1 ulp off at times)."""
        ramp = _torch_linspace_f32(math.log(self.sigma_min), math.log(self.sigma_max), n)
        return np.exp(ramp.astype(np.float64)).astype(np.float32)[::-1].copy()


@dataclasses.dataclass(frozen=True)
class EDMEulerScheduler(_EDMBase):
    """diffusers' ``EDMEulerScheduler`` (deterministic, ``s_churn = 0``) configured for SVD. Its step is
    :func:`svd_jax.scheduler.step` (equal for sigma_data 1); the sigmas: the Karras ramp in float64 (diffusers
    computes it so) or the exponential one in float32, then ``final_sigmas_type`` "zero" or "sigma_min" (the
    last sigma of the ramp)."""

    def _ramp_sigmas(self, n: int) -> np.ndarray:
        if self.sigma_schedule == "karras":
            ramp = _linspace_f64(n)
            min_inv, max_inv = self._karras()
            return (max_inv + ramp * (min_inv - max_inv)) ** self.rho
        return self._exponential_f32(n)

    def _final_sigma(self, sigmas):
        return 0.0 if self.final_sigmas_type == "zero" else float(sigmas[-1])


@dataclasses.dataclass(frozen=True)
class EDMDPMSolverMultistepScheduler(_EDMBase):
    """diffusers' ``EDMDPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``) configured for SVD.

    ``solver_order`` 1, 2 (DPM-Solver++ 2M) or 3; ``solver_type`` "midpoint" or "heun" (order 2 and 3 differ
    only where diffusers' formulas do); ``lower_order_final`` (first order at the last step and second at the one
    before when N < 15), ``euler_at_final``; ``final_sigmas_type`` "zero" (the last step returns the denoised
    prediction; always first order, as diffusers) or "sigma_min" (ends at ``sigma_min``). The Karras and
    exponential ramps are computed in float32, as diffusers does for this scheduler.
    """

    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    thresholding: bool = False

    kind = "multistep"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        _check(name, "algorithm_type", self.algorithm_type, ("dpmsolver++",))
        _check(name, "solver_type", self.solver_type, SOLVER_TYPES)
        _check(name, "solver_order", self.solver_order, (1, 2, 3))
        if self.thresholding:
            raise ValueError(f"{name}: thresholding=True is not supported (it is for pixel-space models); "
                             "supported value: False")

    def _ramp_sigmas(self, n: int) -> np.ndarray:
        if self.sigma_schedule == "karras":
            ramp = _torch_linspace_f32(0.0, 1.0, n)
            min_inv, max_inv = self._karras()
            f32 = np.float32
            return (f32(max_inv) + ramp * f32(min_inv - max_inv)) ** f32(self.rho)
        return self._exponential_f32(n)

    def _final_sigma(self, sigmas):
        return 0.0 if self.final_sigmas_type == "zero" else float(np.float32(self.sigma_min))

    def orders(self, n: int) -> list[int]:
        """The order diffusers' ``step`` uses at each of ``n`` steps."""
        out = []
        for i in range(n):
            lower_nums = min(i, self.solver_order)
            final = i == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15)
                                    or self.final_sigmas_type == "zero")
            second = i == n - 2 and self.lower_order_final and n < 15
            if self.solver_order == 1 or lower_nums < 1 or final:
                out.append(1)
            elif self.solver_order == 2 or lower_nums < 2 or second:
                out.append(2)
            else:
                out.append(3)
        return out

    def coefficients(self, sigmas) -> np.ndarray:
        """(N, 1 + solver_order) float32: step i computes ``c[i, 0] * x_i + sum_j c[i, 1 + j] * D_{i - j}``
        (D the denoised predictions, D_i this step's), the data-prediction DPM-Solver++ update of the order
        :meth:`orders` gives, in float64 from the float32 sigmas (alpha = 1: the inputs are pre-scaled)."""
        s = np.asarray(sigmas, np.float64)
        n, k = len(s) - 1, self.solver_order
        out = np.zeros((n, 1 + k))
        lam = lambda v: -np.log(v) if v > 0 else np.inf  # lambda = log(alpha) - log(sigma), alpha = 1
        basis = np.eye(k)  # D_i, D_{i-1}, D_{i-2} as coefficient vectors
        for i, order in enumerate(self.orders(n)):
            h = lam(s[i + 1]) - lam(s[i])
            if h == 0:  # a zero-length step (a ramp ending at sigma_min, then final sigma sigma_min): identity
                out[i, 0] = 1.0  # (diffusers' heun formula divides 0 by 0 there: NaN)
                continue
            ratio = s[i + 1] / s[i]  # sigma_t / sigma_s0 (= exp(-h)); 0 at a final sigma of 0
            e = ratio - 1.0  # exp(-h) - 1
            d0 = basis[0]
            if order == 1:
                c = -e * d0
            else:
                r0 = (lam(s[i]) - lam(s[i - 1])) / h
                d1_0 = (basis[0] - basis[1]) / r0
                if order == 2:  # midpoint: -0.5 e D1; heun: (e / h + 1) D1
                    k1 = -0.5 * e if self.solver_type == "midpoint" else e / h + 1.0
                    c = -e * d0 + k1 * d1_0
                else:
                    r1 = (lam(s[i - 1]) - lam(s[i - 2])) / h
                    d1_1 = (basis[1] - basis[2]) / r1
                    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    c = -e * d0 + (e / h + 1.0) * d1 - ((e + h) / h ** 2 - 0.5) * d2
            out[i, 0], out[i, 1:] = ratio, c
        return out.astype(np.float32)


def _linspace_f64(n: int) -> np.ndarray:
    """``torch.linspace(0, 1, n, dtype=torch.float64)`` (start + step * i for the first half, end - step *
    (n - 1 - i) for the second)."""
    if n == 1:
        return np.zeros(1)
    step = 1.0 / (n - 1)
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, step * i, 1.0 - step * (n - 1 - i))


def denoised(model_output, sample, sigma, prediction_type: str = "v_prediction"):
    """EDM's ``precondition_outputs`` (sigma_data 1): ``c_skip * sample + c_out * model_output`` with
    ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)`` (v) or ``+sigma / sqrt(...)``
    (epsilon); arrays of one shape (e.g. (B, F, h, w, C)) and a scalar sigma -> float32."""
    x = jnp.asarray(sample, jnp.float32)
    m = jnp.asarray(model_output, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    c_skip = 1.0 / (sigma * sigma + 1.0)
    c_out = sigma / jnp.sqrt(sigma * sigma + 1.0)
    return c_skip * x + (-c_out if prediction_type == "v_prediction" else c_out) * m


def multistep_update(model_output, sample, history, sigma, coefs, prediction_type: str = "v_prediction"):
    """One DPM-Solver++ step from the host-computed coefficients of this step.

    Args:
      model_output: (B, F, h, w, C) the model's prediction at ``sigma`` (CFG already combined).
      sample: (B, F, h, w, C) the current sample x_i.
      history: (K - 1, B, F, h, w, C) the previous steps' denoised predictions, newest first (zeros before
        there are any; their coefficients are zero then). K = solver_order.
      sigma: scalar sigmas[i]; coefs: (1 + K,) this step's row of
        :meth:`EDMDPMSolverMultistepScheduler.coefficients`.

    Returns:
      (x_{i+1} float32, the new history: this step's prediction first).
    """
    d = denoised(model_output, sample, sigma, prediction_type)
    x = coefs[0] * jnp.asarray(sample, jnp.float32) + coefs[1] * d
    for j in range(history.shape[0]):
        x = x + coefs[2 + j] * history[j]
    new_history = jnp.concatenate([d[None], history[:-1]]) if history.shape[0] else history
    return x, new_history


def make_scheduler(name: str, base=None, config: Mapping[str, Any] | None = None):
    """A scheduler by name: ``"euler"`` (``base``, the pipeline folder's EulerScheduler, with ``config``
    overrides), ``"edm_euler"`` or ``"edm_dpmsolver++"`` (SVD's settings, the base's sigma_min / sigma_max /
    prediction_type where it has them, then ``config``: diffusers-named keys, e.g. ``{"solver_order": 3,
    "sigma_schedule": "exponential"}``)."""
    from .scheduler import EulerScheduler

    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {SCHEDULER_NAMES} (or a scheduler object); got {name!r}")
    if name == "euler":
        if base is None:
            return EulerScheduler.from_config(dict(config or {}))
        return EulerScheduler.from_config({**dataclasses.asdict(base), **dict(config or {})}) if config else base
    inherited = {}
    if base is not None:
        inherited = {k: getattr(base, k) for k in ("sigma_min", "sigma_max", "prediction_type")
                     if getattr(base, k, None) is not None}
        if inherited.get("prediction_type") not in EDM_PREDICTION_TYPES:
            inherited.pop("prediction_type", None)
    cls = EDMEulerScheduler if name == "edm_euler" else EDMDPMSolverMultistepScheduler
    return cls.from_config(inherited, **dict(config or {}))
