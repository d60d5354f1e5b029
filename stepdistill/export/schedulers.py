"""The diffusers scheduler that reproduces a student's SamplingRecipe, the pipeline arguments that make it visit
exactly the student's timesteps, and what the pipeline's default call (50 steps, no other argument) does with it
(`default_call`, for the model card):
  * renoise on VP: `LCMScheduler`. Step i predicts x0 at t_i; before the next step it re-noises x0 to t_{i+1} with
    fresh noise. Its original grid is every training timestep (original_inference_steps = T), so uniform grids like
    [999] or [999, 749, 499, 249] come out of `set_timesteps(k)`, other grids (DMD2's one step at t=399) are
    explicit `timesteps`, and the pipeline's default 50 steps are allowed (50 LCM steps on the student).
  * ode on VP (MCD / TSCD segments, BOOT): deterministic DDIM jumps between the timesteps, the last to x0:
    `DDIMScheduler` with trailing spacing where it visits the same timesteps, else `EulerDiscreteScheduler`
    (x0-based Euler in sigma space is DDIM) on explicit `timesteps`.
  * flow schedules: `FlowMatchEulerDiscreteScheduler` without shift on explicit `sigmas = t / T`, with
    `stochastic_sampling` for renoise (x0 re-noised to the next sigma with fresh noise), deterministic Euler for
    ode; a multistep flow (`any_num_steps`) keeps the student's shift and samples any number of steps. A pipeline
    whose call takes no `sigmas` (WanPipeline) gets the shift under which `set_timesteps(k)` visits the student's
    sigmas (1 step at sigma 1, or the teacher's own shifted Euler grid), or a clear refusal. Pipelines
    written for VP schedulers (SD, SDXL) scale their first noise by `scheduler.init_noise_sigma`, which that
    scheduler lacks: its config then records `init_noise_sigma = 1` (a flow's pure noise has unit variance), which
    diffusers serves as the attribute (warning that the key is not an argument of the scheduler).
Why the default call cannot be the k-step sample itself: every diffusers scheduler turns num_inference_steps=50
into 50 timesteps, and a schedule that repeats one timestep (zero-length steps) makes `index_for_timestep` start
at the second entry and step past the end of the sigmas.
"""
from __future__ import annotations

import inspect

from stepdistill.students.base import SamplingRecipe

# The student outputs x0 itself, without LCM's consistency boundary condition x0 = c_skip x_t + c_out f.
# With timestep_scaling = 1e4, c_skip(t) = 0.25 / ((1e4 t)^2 + 0.25) < 3e-9 and c_out = 1 - O(1e-9) for t >= 1.
TIMESTEP_SCALING = 1.0e4


def scheduler_for(recipe: SamplingRecipe, teacher_scheduler_config: dict, reads_init_noise_sigma: bool = False,
                  takes_sigmas: bool = True):
    """(scheduler, pipeline kwargs) for a recipe; the teacher's scheduler config supplies the VP betas.
    `reads_init_noise_sigma`: the pipeline scales its first noise by `scheduler.init_noise_sigma` (SD, SDXL);
    `takes_sigmas`: its call accepts explicit `sigmas` (SD3, Flux; not Wan)."""
    config = dict(teacher_scheduler_config)
    if recipe.schedule.kind == "flow":
        scheduler, kwargs = flow_scheduler(config, recipe, takes_sigmas)
        if reads_init_noise_sigma:
            scheduler.register_to_config(init_noise_sigma=1.0)
        return scheduler, kwargs
    if recipe.sampler == "ode":
        return vp_ode_scheduler(config, recipe.timesteps, recipe.prediction_type)
    if recipe.sampler == "renoise":
        return vp_renoise_scheduler(config, recipe.timesteps, recipe.prediction_type)
    raise ValueError(f"no diffusers scheduler reproduces the {recipe.sampler!r} sampler of a VP student")


def _scheduler_args(cls, config: dict) -> dict:
    """The teacher scheduler's settings that `cls` accepts (betas, training steps, ...)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


def _integer_timesteps(timesteps: list[float], num_train: int) -> list[int]:
    ints = [int(t) for t in timesteps]
    if ints != list(timesteps) or not all(0 <= t < num_train for t in ints):
        raise ValueError(f"VP student timesteps must be integers in [0, {num_train}), got {timesteps}: set "
                         f"student.timesteps to integers below {num_train}, e.g. [{num_train - 1}]")
    return ints


def vp_renoise_scheduler(config: dict, timesteps: list[float], prediction_type: str):
    """LCMScheduler for a re-noising VP student, and the kwargs that make it visit exactly `timesteps`. Its original
    grid is every training timestep (original_inference_steps = T): any integer grid lies on it, and the pipeline's
    default 50 steps are allowed."""
    from diffusers import LCMScheduler

    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"a VP student's prediction_type must be epsilon, v_prediction or sample for "
                         f"LCMScheduler, got {prediction_type!r}")
    num_train = int(config.get("num_train_timesteps", 1000))
    ints = _integer_timesteps(timesteps, num_train)
    k = len(ints)
    scheduler = LCMScheduler.from_config(
        _scheduler_args(LCMScheduler, config), prediction_type=prediction_type, original_inference_steps=num_train,
        timestep_scaling=TIMESTEP_SCALING, clip_sample=False, thresholding=False)
    scheduler.set_timesteps(k)
    if scheduler.timesteps.tolist() == ints:
        kwargs = {"num_inference_steps": k}
    else:
        scheduler.set_timesteps(timesteps=ints)
        kwargs = {"timesteps": ints}
    if scheduler.timesteps.tolist() != ints:
        raise AssertionError(f"LCMScheduler visits {scheduler.timesteps.tolist()} instead of {ints}")
    return scheduler, kwargs


def vp_ode_scheduler(config: dict, timesteps: list[float], prediction_type: str):
    """A deterministic scheduler that jumps with DDIM between `timesteps` and ends at x0, and its kwargs."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    ints = _integer_timesteps(timesteps, int(config.get("num_train_timesteps", 1000)))
    k = len(ints)
    common = {"prediction_type": prediction_type}
    scheduler = DDIMScheduler.from_config(_scheduler_args(DDIMScheduler, config), **common,
                                          timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                                          thresholding=False)
    scheduler.set_timesteps(k)
    if scheduler.timesteps.tolist() == ints:
        return scheduler, {"num_inference_steps": k}
    # "leading": init_noise_sigma = sqrt(sigma_max^2 + 1) exactly (linspace/trailing use sigma_max)
    scheduler = EulerDiscreteScheduler.from_config(
        _scheduler_args(EulerDiscreteScheduler, config), **common, timestep_spacing="leading",
        final_sigmas_type="zero", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        interpolation_type="linear")
    scheduler.set_timesteps(timesteps=ints)
    if scheduler.timesteps.tolist() != ints:
        raise AssertionError(f"EulerDiscreteScheduler visits {scheduler.timesteps.tolist()} instead of {ints}")
    return scheduler, {"timesteps": ints}


def flow_scheduler(config: dict, recipe: SamplingRecipe, takes_sigmas: bool = True):
    """FlowMatchEulerDiscreteScheduler: explicit sigmas = t / T (no shift) for fixed timesteps (the default call:
    50 Euler steps of the unshifted flow); the student's own shift and any number of steps for a multistep flow;
    for a pipeline without a `sigmas` argument, a shift whose own k-step grid is the student's timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if recipe.prediction_type != "flow":
        raise ValueError(f"a flow student must predict velocity (prediction_type flow), got "
                         f"{recipe.prediction_type!r}")
    num_train = recipe.schedule.num_train_timesteps
    common = dict(num_train_timesteps=num_train, use_dynamic_shifting=False, shift_terminal=None,
                  use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False)
    if recipe.any_num_steps:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=recipe.schedule.shift, stochastic_sampling=False, **common)
        return scheduler, {"num_inference_steps": recipe.num_steps}
    sigmas = [float(t) / num_train for t in recipe.timesteps]
    stochastic = recipe.sampler == "renoise"
    if takes_sigmas:
        return FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=stochastic, **common), {"sigmas": sigmas}
    for shift in dict.fromkeys((1.0, recipe.schedule.shift, float(config.get("shift", 1.0)))):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic, **common)
        scheduler.set_timesteps(len(sigmas))
        if all(abs(a - b) < 1e-5 for a, b in zip(scheduler.sigmas[:-1].tolist(), sigmas)):
            return scheduler, {"num_inference_steps": len(sigmas)}
    grid = [round(t, 3) for t in recipe.schedule.inference_timesteps(len(sigmas))]
    raise ValueError(f"the pipeline's call takes no `sigmas`, and no FlowMatchEulerDiscreteScheduler visits the "
                     f"student's timesteps {list(recipe.timesteps)} from num_inference_steps={len(sigmas)}: train the "
                     f"student on timesteps the scheduler's own grid has, e.g. student.timesteps={grid}")
