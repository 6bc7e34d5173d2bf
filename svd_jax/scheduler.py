"""Euler sampler of Stable Video Diffusion, equal to diffusers' ``EulerDiscreteScheduler``.

Two halves:

* :class:`EulerScheduler` is the (frozen) scheduler config, read from a diffusers ``scheduler_config.json``.
  :meth:`EulerScheduler.set_timesteps` builds the whole schedule on the host in numpy and returns an
  :class:`EulerSchedule`: ``sigmas`` (N+1,), ``timesteps`` (N,) and ``init_noise_sigma``. Nothing in it is
  stateful; there is no step index to keep in sync.
* :func:`scale_model_input` and :func:`step` are pure ``jax.numpy`` functions of one step's ``sigma`` and
  ``sigma_next``, so a sampling loop can run inside ``jax.lax.scan`` / ``fori_loop`` with a traced step index::

      schedule = scheduler.set_timesteps(25)
      sigmas, timesteps = jnp.asarray(schedule.sigmas), jnp.asarray(schedule.timesteps)
      x = noise * schedule.init_noise_sigma

      def body(x, i):
          v = model(scale_model_input(x, sigmas[i]), timesteps[i])
          return step(v, x, sigmas[i], sigmas[i + 1], scheduler.prediction_type), None

      x, _ = jax.lax.scan(body, x, jnp.arange(schedule.num_inference_steps))

Supported (mirrored value by value, including diffusers' float32/float64 arithmetic):

* sigmas: Karras/EDM (``use_karras_sigmas``, rho 7, with ``sigma_min``/``sigma_max`` from the config or, when
  absent, from the training schedule), or the DDPM training sigmas linearly interpolated at "linspace",
  "leading" (with ``steps_offset``) or "trailing" timesteps; betas "linear", "scaled_linear",
  "squaredcos_cap_v2" or ``trained_betas``; ``final_sigmas_type`` "zero" or "sigma_min"; user-supplied sigmas.
* timesteps: "continuous" (``0.25 * ln(sigma)``, what SVD uses) or "discrete". As in diffusers, continuous
  timesteps are only produced together with ``prediction_type="v_prediction"``; with any other prediction type
  diffusers (and so this port) returns the discrete timesteps.
* prediction types "v_prediction", "epsilon", "sample" (alias "original_sample").
* the deterministic Euler step (``s_churn = 0``, diffusers' default and what SVD uses).

Not supported (a ``ValueError`` names the option): ``use_exponential_sigmas``, ``use_beta_sigmas``,
``rescale_betas_zero_snr``, ``interpolation_type="log_linear"`` where it would change the result, any other
value of the options above, and stochastic churn.

Precision (float32, CPU, against diffusers 0.42 / torch 2.13):

* Schedules: for the SVD config (Karras sigmas with explicit bounds) the sigmas are bit-identical to diffusers'
  and the timesteps within 1 ulp (float32 log). Betas and ``alphas_cumprod`` reproduce torch's CPU arithmetic
  (FMA linspace, float64-accumulated cumprod); sigmas derived from them can still differ by 1 ulp where torch's
  float32 ``sqrt`` is not correctly rounded (numpy's is).
* Steps: :func:`scale_model_input` and :func:`step` use diffusers' operations in diffusers' order, with true
  divisions (see :func:`_divide`), so an eager loop reproduces diffusers' roundings (bit for bit where the sigmas'
  ``sqrt(sigma^2 + 1)`` agree). Under ``jit`` XLA contracts ``a*b + c`` into FMAs; that is harmless (~3e-7
  relative over 25 steps) except for N <= 2 steps, where the Euler update cancels samples of size sigma_max and
  diffusers' own float32 result is ~5e-5 from exact arithmetic: the jitted result is as accurate, but ~2e-5
  from diffusers'.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "CONFIG_NAME",
    "EulerSchedule",
    "EulerScheduler",
    "PREDICTION_TYPES",
    "scale_model_input",
    "step",
]

CONFIG_NAME = "scheduler_config.json"

PREDICTION_TYPES = ("v_prediction", "epsilon", "sample", "original_sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
TIMESTEP_TYPES = ("continuous", "discrete")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
INTERPOLATION_TYPES = ("linear",)

# Keys that appear in scheduler configs (SVD's among them) but mean nothing to the Euler scheduler.
IGNORED_KEYS = frozenset({
    "clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "variance_type", "timestep_values", "algorithm_type",
    "solver_order", "solver_type", "lower_order_final", "euler_at_final", "use_lu_lambdas", "lambda_min_clipped",
    "predict_x0", "sigma_data", "noise_sampler_seed", "rho",
})

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------------------


@struct.dataclass
class EulerSchedule:
    """One sampling schedule, as :meth:`EulerScheduler.set_timesteps` returns it.

    A flax pytree (``sigmas`` and ``timesteps`` are leaves, ``init_noise_sigma`` is static), so it can be passed
    into jitted functions as is.

    Attributes:
      sigmas: (N+1,) float32 noise levels; ``sigmas[i]`` is used by step i and ``sigmas[N]`` is the terminal
        value (0 for the default ``final_sigmas_type="zero"``).
      timesteps: (N,) float32 values fed to the model at each step; for SVD (continuous, v-prediction)
        ``0.25 * ln(sigmas[:N])``.
      init_noise_sigma: python float; multiply unit-variance initial noise by it (``sqrt(max(sigma)^2 + 1)`` for
        "leading" spacing, ``max(sigma)`` for "linspace"/"trailing", as diffusers).
    """

    sigmas: Any
    timesteps: Any
    init_noise_sigma: float = struct.field(pytree_node=False)

    @property
    def num_inference_steps(self) -> int:
        """N, the number of Euler steps (``len(timesteps)``)."""
        return int(self.timesteps.shape[0])


# --------------------------------------------------------------------------------------------------------------
# Host-side helpers reproducing diffusers' (torch float32) arithmetic in numpy
# --------------------------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the second,
    with float32 ``start``/``end``/``step`` and a fused multiply-add (one rounding). The exact float32 product plus
    float32 operand fits a float64, so float64 arithmetic followed by one cast to float32 reproduces it.
    """
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    if steps == 1:
        return np.array([start32], f32)
    step32 = (end32 - start32) / f32(steps - 1)
    idx = np.arange(steps, dtype=np.float64)
    low = (np.float64(start32) + np.float64(step32) * idx).astype(f32)
    high = (np.float64(end32) - np.float64(step32) * (steps - 1 - idx)).astype(f32)
    return np.where(idx < steps // 2, low, high)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' cosine ("squaredcos_cap_v2") betas: computed in python floats, stored as float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
             for i in range(num_diffusion_timesteps)]
    return np.asarray(betas, np.float32)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``EulerDiscreteScheduler._sigma_to_t`` (numpy, same dtypes): sigma -> fractional train timestep."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def _readonly(a: np.ndarray) -> np.ndarray:
    """``a`` (a fresh array) made contiguous and read-only, so frozen results stay frozen."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _choice(name: str, value: Any, supported: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the option and the supported values unless ``value`` is one of them."""
    if value not in supported:
        raise ValueError(f"EulerScheduler: {name}={value!r} is not supported; supported values: "
                         f"{', '.join(repr(s) for s in supported)}")


# --------------------------------------------------------------------------------------------------------------
# The scheduler config
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EulerScheduler:
    """Config of diffusers' ``EulerDiscreteScheduler`` (same field names and defaults); builds schedules.

    Build it from a diffusers config with :meth:`from_config` / :meth:`from_pretrained`; unsupported options
    raise ``ValueError`` at construction. The instance is immutable and holds no sampling state.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("timestep_type", self.timestep_type, TIMESTEP_TYPES)
        _choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.trained_betas is None:
            _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        elif len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"EulerScheduler: trained_betas holds {len(self.trained_betas)} values but "
                             f"num_train_timesteps={self.num_train_timesteps}")
        for flag in ("use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"):
            if getattr(self, flag):
                raise ValueError(f"EulerScheduler: {flag}=True is not supported; supported value: False "
                                 "(SVD uses use_karras_sigmas=True)")
        # log_linear interpolation only matters when the sigmas come from the interpolated training schedule.
        karras_ignores_interp = self.use_karras_sigmas and self.sigma_min is not None and self.sigma_max is not None
        if not karras_ignores_interp:
            _choice("interpolation_type", self.interpolation_type, INTERPOLATION_TYPES)
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        if (isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, (int, np.integer))
                or self.num_train_timesteps < 2):
            raise ValueError("EulerScheduler: num_train_timesteps must be an int >= 2, "
                             f"got {self.num_train_timesteps!r}")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"EulerScheduler: {name} must be a finite positive number or None, got {value!r}")

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EulerScheduler:
        """Build from a diffusers scheduler config dict (the content of ``scheduler_config.json``).

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) and legacy keys the Euler scheduler
        ignores (``clip_sample``, ``set_alpha_to_one``, ``skip_prk_steps``, ...) are skipped; other unknown keys
        are skipped with a warning, as diffusers does. Unsupported option values raise ``ValueError``.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"EulerScheduler.from_config expects a mapping, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in config.items():
            if key in fields:
                kwargs[key] = value
            elif not key.startswith("_") and key not in IGNORED_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"EulerScheduler: ignoring unknown scheduler config keys {sorted(unknown)}", stacklevel=2)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"):
            if key in kwargs:
                kwargs[key] = bool(kwargs[key])  # diffusers allows None for False
        for key in ("num_train_timesteps", "steps_offset"):
            if key in kwargs:
                value = kwargs[key]
                if isinstance(value, bool) or int(value) != value:
                    raise ValueError(f"EulerScheduler: {key} must be an integer, got {value!r}")
                kwargs[key] = int(value)
        for key in ("beta_start", "beta_end", "sigma_min", "sigma_max"):
            if kwargs.get(key) is not None:
                kwargs[key] = float(kwargs[key])
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in np.asarray(kwargs["trained_betas"]).reshape(-1))
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: PathLike, subfolder: str | None = "scheduler") -> EulerScheduler:
        """Read ``scheduler_config.json`` from a local folder and build the scheduler.

        Looks at ``path/subfolder/scheduler_config.json``, then ``path/scheduler_config.json`` (what
        ``scheduler.save_pretrained(path)`` writes); ``path`` may also be the json file itself. Raises
        ``ValueError`` naming the places it looked when none exists, or when the file is not valid json.
        """
        root = Path(path)
        if root.is_file():
            candidates = [root]
        else:
            candidates = [root / subfolder / CONFIG_NAME] if subfolder else []
            candidates.append(root / CONFIG_NAME)
        for candidate in candidates:
            if candidate.is_file():
                try:
                    config = json.loads(candidate.read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"EulerScheduler: {candidate} is not valid json: {e}") from e
                return cls.from_config(config)
        raise ValueError(f"EulerScheduler: no {CONFIG_NAME} found; looked for "
                         f"{', '.join(str(c) for c in candidates)}")

    # ---------------------------------------------------------------------------------------------- training schedule

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """(num_train_timesteps,) float32 cumulative products of ``1 - beta``, bit for bit as diffusers (torch)."""
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        elif self.beta_schedule == "linear":
            betas = _torch_linspace_f32(self.beta_start, self.beta_end, self.num_train_timesteps)
        elif self.beta_schedule == "scaled_linear":
            betas = _torch_linspace_f32(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps) ** 2
        else:  # squaredcos_cap_v2
            betas = _betas_for_alpha_bar(self.num_train_timesteps)
        alphas = np.float32(1.0) - betas
        # torch's CPU cumprod accumulates float32 in float64 and rounds each output.
        return _readonly(np.cumprod(alphas.astype(np.float64)).astype(np.float32))

    @cached_property
    def train_sigmas(self) -> np.ndarray:
        """(num_train_timesteps,) float32 ``sqrt((1 - alphas_cumprod) / alphas_cumprod)``, increasing with t."""
        ac = self.alphas_cumprod
        return _readonly(np.sqrt((np.float32(1.0) - ac) / ac))

    # ---------------------------------------------------------------------------------------------- schedules

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """The (n,) float32 train timesteps of ``timestep_spacing`` (diffusers' set_timesteps, verbatim)."""
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        if self.timestep_spacing == "leading":
            step_ratio = T // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
            timesteps += self.steps_offset
            return timesteps
        step_ratio = T / n  # trailing
        timesteps = np.arange(T, 0, -step_ratio).round().copy().astype(np.float32)
        timesteps -= 1
        return timesteps

    def _init_noise_sigma(self, sigmas: np.ndarray) -> float:
        """diffusers' ``init_noise_sigma`` property (float32 arithmetic) for the given sigmas."""
        max_sigma = np.float32(np.max(sigmas))
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + np.float32(1.0)))

    def set_timesteps(self, num_inference_steps: int | None = None,
                      sigmas: Sequence[float] | None = None) -> EulerSchedule:
        """Build the sampling schedule (host side, numpy), as diffusers' ``set_timesteps``.

        Args:
          num_inference_steps: N >= 1, the number of Euler steps. The sigmas get a terminal value appended
            (0 by default), so ``sigmas`` has N+1 entries.
          sigmas: instead of N, explicit noise levels (a sequence of >= 2 floats, decreasing as a rule), used
            as-is: **no** terminal value is appended, so the list must end with its own final sigma (usually 0);
            N = len(sigmas) - 1 and the timesteps come from all but the last.

        Exactly one of the two must be given.

        Returns:
          :class:`EulerSchedule` with ``sigmas`` (N+1,) float32, ``timesteps`` (N,) float32 and
          ``init_noise_sigma``.
        """
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("EulerScheduler.set_timesteps: pass exactly one of num_inference_steps or sigmas")
        continuous = self.timestep_type == "continuous" and self.prediction_type == "v_prediction"
        log_sigmas = np.log(self.train_sigmas)

        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float64)
            if sig.ndim != 1 or sig.shape[0] < 2:
                raise ValueError(f"EulerScheduler.set_timesteps: sigmas must be a 1-D sequence of at least 2 values "
                                 f"(the final one included); got shape {sig.shape}")
            sig = sig.astype(np.float32)
            if not np.all(np.isfinite(sig)) or np.any(sig[:-1] <= 0) or sig[-1] < 0:
                raise ValueError("EulerScheduler.set_timesteps: sigmas must be finite, > 0 except the last, "
                                 f"and the last >= 0; got {sig.tolist()}")
            timesteps = None if continuous else _sigma_to_t(sig[:-1], log_sigmas)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise ValueError(f"EulerScheduler.set_timesteps: num_inference_steps must be an int, "
                                 f"got {num_inference_steps!r}")
            n = int(num_inference_steps)
            if n < 1:
                raise ValueError(f"EulerScheduler.set_timesteps: num_inference_steps must be >= 1, got {n}")
            if not self.use_karras_sigmas and n > self.num_train_timesteps:
                raise ValueError(f"EulerScheduler.set_timesteps: num_inference_steps={n} exceeds "
                                 f"num_train_timesteps={self.num_train_timesteps} (not supported without "
                                 "use_karras_sigmas)")
            timesteps = self._spaced_timesteps(n)
            train = self.train_sigmas
            sig = np.interp(timesteps, np.arange(0, len(train)), train)  # float64
            if self.use_karras_sigmas:
                sigma_min = self.sigma_min if self.sigma_min is not None else sig[-1].item()
                sigma_max = self.sigma_max if self.sigma_max is not None else sig[0].item()
                rho = 7.0
                ramp = np.linspace(0, 1, n)
                min_inv_rho = sigma_min ** (1 / rho)
                max_inv_rho = sigma_max ** (1 / rho)
                sig = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
                timesteps = None if continuous else _sigma_to_t(sig, log_sigmas)
            sigma_last = 0.0 if self.final_sigmas_type == "zero" else float(train[0])
            sig = np.concatenate([sig, [sigma_last]]).astype(np.float32)

        if continuous:
            # diffusers: 0.25 * log of the float32 sigma, in float32 (the 0.25 is exact).
            timesteps = np.log(sig[:-1].astype(np.float64)).astype(np.float32) * np.float32(0.25)
        else:
            timesteps = np.asarray(timesteps).astype(np.float32)
        return EulerSchedule(sigmas=_readonly(sig), timesteps=_readonly(timesteps),
                             init_noise_sigma=self._init_noise_sigma(sig))


# --------------------------------------------------------------------------------------------------------------
# Per-step math (jax.numpy; traced sigmas are fine)
# --------------------------------------------------------------------------------------------------------------


def _divide(x, d):
    """``x / d`` for an array ``x`` and a scalar ``d``, as a true (correctly rounded) elementwise division.

    XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal, which differs from
    torch's division by up to 1 ulp. Euler steps with few, large sigmas are ill-conditioned in float32 (the update
    ``x + (x - x0) / sigma * (sigma_next - sigma)`` cancels values of size sigma_max), so that ulp grows to ~6e-5
    of the result. Hiding the broadcast behind an optimisation barrier keeps the division a true one. Eagerly that
    costs one sample-sized buffer; under ``jit`` the barrier is dropped after simplification and costs nothing.
    """
    d = jax.lax.optimization_barrier(jnp.broadcast_to(d.astype(x.dtype), x.shape))
    return x / d


def scale_model_input(sample, sigma):
    """Scale the sample before it enters the model: ``sample / sqrt(sigma^2 + 1)`` (EDM ``c_in``).

    Args:
      sample: array of any shape, e.g. latents (B, F, h, w, C).
      sigma: scalar (python float or 0-d array, may be traced), the current step's ``sigmas[i]``.

    Returns:
      Array of ``sample``'s shape and dtype; computed in float32 (at least).
    """
    sample = jnp.asarray(sample)
    dtype = jnp.promote_types(sample.dtype, jnp.float32)
    sigma = jnp.asarray(sigma, dtype)
    return _divide(sample.astype(dtype), jnp.sqrt(sigma * sigma + 1)).astype(sample.dtype)


def step(model_output, sample, sigma, sigma_next, prediction_type: str = "v_prediction"):
    """One deterministic Euler step (diffusers' ``EulerDiscreteScheduler.step`` with ``s_churn = 0``).

    ``x0 = c_out * model_output + c_skip * sample`` for v-prediction (``c_skip = 1/(sigma^2+1)``,
    ``c_out = -sigma/sqrt(sigma^2+1)``), ``sample - sigma * model_output`` for epsilon, ``model_output`` for
    sample; then ``sample + (sample - x0) / sigma * (sigma_next - sigma)``. At ``sigma_next = 0`` that is x0.

    Args:
      model_output: array (e.g. (B, F, h, w, C)), the model's prediction for ``scale_model_input(sample, sigma)``.
      sample: array of the same shape, the current (unscaled) sample x_i.
      sigma: scalar ``sigmas[i]`` (> 0; python float or 0-d array, may be traced).
      sigma_next: scalar ``sigmas[i + 1]``.
      prediction_type: "v_prediction" (SVD), "epsilon" or "sample" ("original_sample"); a python string.

    Returns:
      x_{i+1}, of ``model_output``'s shape and dtype. Like diffusers, the arithmetic runs in float32 (sample
      upcast) and the result is cast back to ``model_output.dtype``; unlike diffusers, a low-precision
      ``model_output`` is upcast too (diffusers multiplies it by the float32 coefficient in its own dtype).

    Eagerly this reproduces diffusers' float32 roundings; under ``jit`` XLA may fuse multiply-adds (see the
    module docstring for what that means for 1- or 2-step schedules).
    """
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    model_output = jnp.asarray(model_output)
    out_dtype = model_output.dtype
    dtype = jnp.promote_types(out_dtype, jnp.float32)
    sample = jnp.asarray(sample).astype(dtype)
    mo = model_output.astype(dtype)
    sigma = jnp.asarray(sigma, dtype)
    sigma_next = jnp.asarray(sigma_next, dtype)
    sigma_hat = sigma  # gamma = 0 without churn
    if prediction_type == "v_prediction":
        # The barrier keeps XLA from turning ``-sigma / sqrt(.)`` into ``-sigma * rsqrt(.)`` (a different rounding).
        c_out = -sigma / jax.lax.optimization_barrier(jnp.sqrt(sigma * sigma + 1))
        pred_original_sample = mo * c_out + _divide(sample, sigma * sigma + 1)
    elif prediction_type == "epsilon":
        pred_original_sample = sample - sigma_hat * mo
    else:  # sample / original_sample
        pred_original_sample = mo
    derivative = _divide(sample - pred_original_sample, sigma_hat)
    dt = sigma_next - sigma_hat
    return (sample + derivative * dt).astype(out_dtype)
