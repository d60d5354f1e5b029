"""Noise-schedule math: the only module that knows alpha_t, sigma_t and the model parameterizations.

Every schedule here is written as x_t = alpha_t * x0 + sigma_t * eps:
  * discrete VP (DDPM/SD/SDXL): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), t in model timesteps 0..T-1;
    a fractional t interpolates the Karras sigma sqrt((1-abar)/abar) linearly, as diffusers' Euler scheduler does.
  * flow matching (SD3-style rectified flow): sigma = t / T, alpha = 1 - sigma, with the resolution shift
    sigma' = shift * sigma / (1 + (shift - 1) * sigma) applied where timesteps are chosen (grids, sampling).
    Flux's dynamic shifting is this shift with shift = exp(mu), mu linear in the image's token count
    (`resolution_shift`), so a Flux schedule is a flow schedule built for one resolution.
Model outputs are one of `epsilon`, `v_prediction` (v = alpha*eps - sigma*x0), `sample` (x0) or `flow`
(velocity u = eps - x0). All conversions are affine in the output, so guidance may be combined on raw outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
InferenceGrid = Literal["scheduler", "flux"]


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15, time_shift_type: str = "exponential") -> float:
    """The flow shift of a dynamically shifted scheduler at `image_seq_len` tokens (Flux: latent h/2 * w/2).
    mu interpolates linearly from base_shift at base_seq_len to max_shift at max_seq_len (diffusers'
    `calculate_shift`, defaults of FLUX.1-dev's scheduler config); the time shift exp(mu) / (exp(mu) + 1/s - 1) is
    the fixed shift exp(mu) (mu itself for time_shift_type "linear")."""
    mu = base_shift + (max_shift - base_shift) * (image_seq_len - base_seq_len) / (max_seq_len - base_seq_len)
    if time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type {time_shift_type!r} is not 'exponential' or 'linear'")
    return math.exp(mu) if time_shift_type == "exponential" else mu


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] (or a scalar) so it broadcasts against `like` [B, ...]."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


@dataclass
class NoiseSchedule:
    kind: Literal["vp", "flow"]
    prediction_type: PredictionType
    num_train_timesteps: int = 1000
    alphas_cumprod: Tensor | None = None  # float64 [T], VP only
    shift: float = 1.0  # flow only
    # flow only: an n-step sampler's sigmas before the shift: linspace(1, shift^-1(1/T)) as the FlowMatch
    # scheduler's own set_timesteps(n) (SD3), or linspace(1, 1/n) as FluxPipeline passes them
    inference_grid: InferenceGrid = "scheduler"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if self.kind == "vp":
            if self.alphas_cumprod is None:
                raise ValueError("a VP schedule needs alphas_cumprod")
            acp = self.alphas_cumprod.to(torch.float64)
            self.alphas_cumprod = acp
            self._karras_sigmas = ((1 - acp) / acp).sqrt()
        elif self.kind != "flow":
            raise ValueError(f"schedule kind {self.kind!r} is not 'vp' or 'flow'")

    # ---------------------------------------------------------------- construction
    @classmethod
    def vp(
        cls,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: PredictionType = "epsilon",
        num_train_timesteps: int = 1000,
    ) -> "NoiseSchedule":
        """SD's default: scaled_linear betas 0.00085..0.012 over 1000 steps, eps prediction."""
        return cls.from_scheduler_config(
            {
                "_class_name": "DDPMScheduler",
                "beta_schedule": beta_schedule,
                "beta_start": beta_start,
                "beta_end": beta_end,
                "prediction_type": prediction_type,
                "num_train_timesteps": num_train_timesteps,
            }
        )

    @classmethod
    def flow(cls, shift: float = 3.0, num_train_timesteps: int = 1000,
             inference_grid: InferenceGrid = "scheduler") -> "NoiseSchedule":
        """SD3's default: shift 3.0, velocity prediction."""
        return cls("flow", "flow", num_train_timesteps, shift=shift, inference_grid=inference_grid)

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], image_seq_len: int | None = None,
                              inference_grid: InferenceGrid = "scheduler") -> "NoiseSchedule":
        """Build from a diffusers scheduler config (dict or FrozenDict); betas come from diffusers itself. A flow
        scheduler with use_dynamic_shifting (Flux) needs the image's token count `image_seq_len`."""
        from diffusers import DDPMScheduler

        config = dict(config)
        name = str(config.get("_class_name", ""))
        if config.get("use_flow_sigmas"):  # a multistep solver on flow sigmas (Wan's UniPC, flow_shift)
            return cls.flow(float(config.get("flow_shift", 1.0)), int(config.get("num_train_timesteps", 1000)),
                            inference_grid)
        if "FlowMatch" in name or ("shift" in config and "beta_start" not in config):
            num_train = int(config.get("num_train_timesteps", 1000))
            if not config.get("use_dynamic_shifting"):
                return cls.flow(float(config.get("shift", 1.0)), num_train, inference_grid)
            if image_seq_len is None:
                raise ValueError(f"{name} with use_dynamic_shifting=True shifts by resolution: pass image_seq_len "
                                 "(the image's token count) or set a fixed `shift` in the scheduler config")
            keys = ("base_seq_len", "max_seq_len", "base_shift", "max_shift", "time_shift_type")
            names = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift", "time_shift_type")
            args = {k: config[n] for k, n in zip(keys, names) if config.get(n) is not None}
            return cls.flow(resolution_shift(image_seq_len, **args), num_train, inference_grid)
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if k in config})
        prediction_type = config.get("prediction_type", "epsilon")
        return cls("vp", prediction_type, ddpm.config.num_train_timesteps, ddpm.alphas_cumprod.clone())

    def timestep_range(self) -> tuple[float, float]:
        """The model timesteps the schedule defines: 0..T-1 for VP (beyond, alpha/sigma would be clamped), 0..T
        for flow (t = T sigma)."""
        return 0.0, float(self.num_train_timesteps - 1 if self.kind == "vp" else self.num_train_timesteps)

    # ---------------------------------------------------------------- alpha_t, sigma_t
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t in float64 for model timesteps t (any shape)."""
        t = torch.as_tensor(t).to(torch.float64)
        if self.kind == "flow":
            sigma = t / self.num_train_timesteps
            return 1 - sigma, sigma
        ks = self._karras_sigmas.to(t.device)
        lo = t.floor().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        k = ks[lo.long()] * (1 - w) + ks[hi.long()] * w
        alpha = (1 + k * k).rsqrt()
        return alpha, k * alpha

    def half_log_snr(self, t: Tensor) -> Tensor:
        """lambda_t = log(alpha_t / sigma_t) in float64 (DPM-Solver's lambda; BOOT's lambda_t is its negative).
        +inf where sigma_t = 0, -inf where alpha_t = 0 (a flow schedule's ends)."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha.log() - sigma.log()

    def _coeffs(self, t: Tensor, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t, device=like.device))
        return _bcast(alpha, like).to(dtype), _bcast(sigma, like).to(dtype)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process x_t = alpha_t x0 + sigma_t eps, computed in fp32 and returned in x0's dtype."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        a, s = self._coeffs(t, x0, dtype)
        return (a * x0.to(dtype) + s * eps.to(dtype)).to(x0.dtype)

    # ---------------------------------------------------------------- parameterizations
    def to_x0_eps(
        self,
        out: Tensor,
        x_t: Tensor,
        t: Tensor,
        prediction_type: PredictionType | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Convert a model output into (x0_hat, eps_hat), in `dtype` (fp64 where DMD2's code uses it)."""
        kind = prediction_type or self.prediction_type
        a, s = self._coeffs(t, x_t, dtype)
        out, x_t = out.to(dtype), x_t.to(dtype)
        if kind == "epsilon":
            return (x_t - s * out) / a, out
        if kind == "sample":
            return out, (x_t - a * out) / s
        if kind == "v_prediction":  # alpha^2 + sigma^2 = 1
            return a * x_t - s * out, s * x_t + a * out
        if kind == "flow":  # alpha + sigma = 1
            return x_t - s * out, x_t + a * out
        raise ValueError(f"prediction_type {kind!r} is not one of {PREDICTION_TYPES}")

    def from_x0_eps(
        self, x0: Tensor, eps: Tensor, t: Tensor, prediction_type: PredictionType | None = None
    ) -> Tensor:
        """The output a model of `prediction_type` should give for (x0, eps): its regression target."""
        kind = prediction_type or self.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "flow":
            return eps - x0
        if kind == "v_prediction":
            dtype = torch.promote_types(x0.dtype, torch.float32)
            a, s = self._coeffs(t, x0, dtype)
            return (a * eps - s * x0).to(x0.dtype)
        raise ValueError(f"prediction_type {kind!r} is not one of {PREDICTION_TYPES}")

    def flow_timestep(self, s: Tensor) -> Tensor:
        """The model timestep of flow time s on a flow schedule, t = T s (the inverse of alpha_sigma's sigma = t / T)."""
        return s * self.num_train_timesteps

    def to_flow(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The rectified-flow coordinates of a state of this schedule: z = x_t / (alpha_t + sigma_t) at flow time
        s = sigma_t / (alpha_t + sigma_t), so that z = (1 - s) x0 + s eps (InstaFlow's change of variables; a DDIM
        step of this schedule is an Euler step of z with velocity eps_hat - x0_hat). Identity for flow schedules.
        Returns (z in fp32, s in float64 [B])."""
        t = torch.as_tensor(t, device=x_t.device)
        alpha, sigma = self.alpha_sigma(t.expand(x_t.shape[0]) if t.ndim == 0 else t)
        z = x_t.to(torch.float64) / _bcast(alpha + sigma, x_t)
        return z.to(torch.float32), sigma / (alpha + sigma)

    # ---------------------------------------------------------------- TrigFlow (sCM, arXiv 2410.11081 §2)
    def trigflow_time(self, t: Tensor, sigma_d: float) -> Tensor:
        """The TrigFlow time s of model timesteps t: tan s = sigma_t / (sigma_d alpha_t), float64 (FastGen's
        TrigFlowPrecond: atan2(sigma, alpha sigma_d))."""
        alpha, sigma = self.alpha_sigma(t)
        return torch.atan2(sigma, alpha * sigma_d)

    def from_trigflow(self, s: Tensor, sigma_d: float) -> tuple[Tensor, Tensor]:
        """(model timestep tau, input scale c_in) of TrigFlow times s, with x_tau = c_in x_s for the TrigFlow state
        x_s = cos s x0 + sin s z, z ~ N(0, sigma_d^2 I): sigma_tau / alpha_tau = sigma_d tan s, c_in = alpha_tau / cos s.
        Differentiable in s (sCD's tangent takes d/ds through it): VP inverts the interpolated Karras sigma of
        `alpha_sigma` piecewise linearly; flow has sigma = sigma_d sin s / (cos s + sigma_d sin s), c_in = 1 /
        (cos s + sigma_d sin s). tau is clamped to `timestep_range`."""
        s = torch.as_tensor(s).to(torch.float64)
        cos, sin = s.cos(), s.sin()
        if self.kind == "flow":
            denom = cos + sigma_d * sin
            tau = self.num_train_timesteps * sigma_d * sin / denom
            return tau.clamp(*self.timestep_range()), 1 / denom
        ks = self._karras_sigmas.to(s.device)
        k = sigma_d * sin / cos
        lo = (torch.searchsorted(ks, k.detach().contiguous()) - 1).clamp(0, len(ks) - 2)
        tau = (lo + (k - ks[lo]) / (ks[lo + 1] - ks[lo])).clamp(*self.timestep_range())
        return tau, (cos * cos + sigma_d**2 * sin * sin).rsqrt()

    def trigflow_velocity(self, out: Tensor, x_s: Tensor, s: Tensor, sigma_d: float,
                          prediction_type: PredictionType | None = None) -> Tensor:
        """dx_s/ds = sigma_d F = (cos s x_s - x0_hat) / sin s (float64) of a model output `out` taken at
        (c_in x_s, tau) from `from_trigflow`: any VP or flow model as a TrigFlow model (FastGen's TrigFlowPrecond)."""
        s = torch.as_tensor(s).to(torch.float64)
        tau, c_in = self.from_trigflow(s, sigma_d)
        x_s = x_s.to(torch.float64)
        x0 = self.to_x0_eps(out, _bcast(c_in, x_s) * x_s, tau, prediction_type, torch.float64)[0]
        return (_bcast(s.cos(), x_s) * x_s - x0) / _bcast(s.sin(), x_s)

    @staticmethod
    def trigflow_x0(velocity: Tensor, x_s: Tensor, s: Tensor) -> Tensor:
        """The consistency function f(x_s, s) = cos s x_s - sin s sigma_d F (sCM Eq. 7): the clean-sample estimate."""
        s = torch.as_tensor(s, device=x_s.device).to(torch.float64)
        return _bcast(s.cos(), x_s) * x_s.to(torch.float64) - _bcast(s.sin(), x_s) * velocity.to(torch.float64)

    # ---------------------------------------------------------------- solver
    def ddim_step(self, x0: Tensor, eps: Tensor, t_prev: Tensor | None) -> Tensor:
        """Deterministic DDIM step (= Euler for flow): x_s = alpha_s x0 + sigma_s eps; t_prev=None gives x0."""
        if t_prev is None:
            return x0
        a, s = self._coeffs(t_prev, x0, x0.dtype)
        return a * x0 + s * eps

    def step(
        self, out: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor | None, prediction_type: PredictionType | None = None
    ) -> Tensor:
        """One deterministic solver step of a model output from t to t_prev, in x_t's dtype (fp32 math)."""
        x0, eps = self.to_x0_eps(out, x_t, t, prediction_type)
        return self.ddim_step(x0, eps, t_prev).to(x_t.dtype)

    def boundary_scalings(
        self, t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
    ) -> tuple[Tensor, Tensor]:
        """Consistency-model c_skip(t), c_out(t) (LCM's discrete form, diffusers LCMScheduler)."""
        scaled = torch.as_tensor(t).to(torch.float64) * timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
        return c_skip, c_out

    # ---------------------------------------------------------------- timesteps
    def skipping_step_grid(self, num_steps: int) -> Tensor:
        """LCM's skipping-step DDIM grid t_i = (i + 1) k - 1, k = T // num_steps (50 -> [19, 39, ..., 999], k = 20;
        the DDIMSolver of diffusers' consistency-distillation scripts), ascending, int64."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must lie in [1, {self.num_train_timesteps}], got {num_steps}")
        k = self.num_train_timesteps // num_steps
        return torch.arange(1, num_steps + 1, dtype=torch.int64) * k - 1

    def shift_sigma(self, sigma: Tensor) -> Tensor:
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def sample_timesteps(
        self,
        n: int,
        low: float = 0.0,
        high: float = 1.0,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """n training timesteps uniform in the fraction range [low, high] of the schedule.

        VP: integers in [int(low*T), int(high*T)] (DMD's 0.02..0.98 gives 20..980); flow: u ~ U[low, high]
        mapped through the shift, t = T * shift(u).
        """
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"timestep fraction range [{low}, {high}] must satisfy 0 <= low <= high <= 1")
        T = self.num_train_timesteps
        if self.kind == "vp":
            lo, hi = int(low * T), min(int(high * T), T - 1)
            return torch.randint(lo, hi + 1, (n,), generator=generator, device="cpu").to(device)
        u = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64, device="cpu")
        return (self.shift_sigma(u) * T).to(torch.float32).to(device)

    def inference_timesteps(self, num_steps: int) -> list[float]:
        """Timesteps of an n-step sampler starting at pure noise ("trailing" spacing for VP; shifted linspace
        for flow, as FlowMatchEulerDiscreteScheduler or FluxPipeline: `inference_grid`). The final step goes to
        clean data."""
        T = self.num_train_timesteps
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        cpu = torch.device("cpu")  # numbers, not tensors, come out: CPU also under a meta default device (planner)
        if self.kind == "vp":
            ts = torch.arange(T, 0, -T / num_steps, device=cpu).round() - 1
            return [int(t) for t in ts]
        if self.inference_grid == "flux":
            sigma_min = torch.tensor(1.0 / num_steps, dtype=torch.float64, device=cpu)
        else:  # diffusers shifts it twice
            sigma_min = self.shift_sigma(torch.tensor(1.0 / T, dtype=torch.float64, device=cpu))
        sigmas = torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64, device=cpu)
        return [float(t) for t in (self.shift_sigma(sigmas) * T).to(torch.float32)]
