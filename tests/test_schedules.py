"""The schedule module against diffusers' own schedulers, step by step."""
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from stepdistill.schedules import NoiseSchedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a denoiser output, varying with x and t."""
    return torch.tanh(0.7 * x + 0.001 * float(t)) * 0.9


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,alpha_to_one", [("trailing", True), ("leading", False), ("linspace", True)])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_ddim_steps_match_diffusers(prediction_type, spacing, alpha_to_one, beta_schedule):
    cfg = dict(SD, beta_schedule=beta_schedule, prediction_type=prediction_type)
    if beta_schedule == "linear":
        cfg.update(beta_start=0.0001, beta_end=0.02)
    ref = DDIMScheduler(**cfg, timestep_spacing=spacing, set_alpha_to_one=alpha_to_one, clip_sample=False)
    ref.set_timesteps(10)
    ours = NoiseSchedule.from_scheduler_config(ref.config)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x.clone()
    for t in ref.timesteps:
        out = fake_model(x_ref, t)
        x_ref = ref.step(out, t, x_ref).prev_sample
        t_prev = int(t) - 1000 // 10
        prev = None if (t_prev < 0 and alpha_to_one) else torch.tensor([max(t_prev, 0)] * 2)
        if t_prev < 0 and not alpha_to_one:
            prev = torch.tensor([0, 0])  # diffusers falls back to alphas_cumprod[0]
        x = ours.step(out, x, torch.tensor([int(t)] * 2), prev)
        # rtol 1e-4: the linear schedule's x0 = (x - sigma eps) / alpha amplifies diffusers' float32 rounding
        # of alphas_cumprod at t = 999 (alpha = 0.006); ours is computed in float64.
        torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-4)


def test_euler_discrete_matches_ddim_in_vp_space():
    """Euler works in Karras sigma space x = x_vp / alpha; our DDIM step with fractional timesteps agrees."""
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    ref.set_timesteps(8)
    ours = NoiseSchedule.from_scheduler_config(ref.config)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * ref.init_noise_sigma
    sigmas = ref.sigmas
    for i, t in enumerate(ref.timesteps):
        x_in = ref.scale_model_input(x, t)  # = x_vp
        out = fake_model(x_in, t)
        x = ref.step(out, t, x).prev_sample
        t_vec = torch.full((2,), float(t))
        t_next = None if i + 1 == len(ref.timesteps) else torch.full((2,), float(ref.timesteps[i + 1]))
        ours_vp = ours.step(out, x_in, t_vec, t_next)
        alpha_next = 1.0 if t_next is None else float(ours.alpha_sigma(t_next)[0][0])
        sigma_next = float(sigmas[i + 1])
        expected = x / (1 + sigma_next**2) ** 0.5 if t_next is not None else x
        torch.testing.assert_close(ours_vp, expected, atol=1e-5, rtol=1e-5)
        assert abs(alpha_next - 1 / (1 + sigma_next**2) ** 0.5) < 1e-6 or t_next is None


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_matches_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(6)
    ours = NoiseSchedule.from_scheduler_config(ref.config)
    assert ours.kind == "flow" and ours.prediction_type == "flow"
    assert ours.inference_timesteps(6) == pytest.approx(ref.timesteps.tolist(), abs=1e-3)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    x_ref = x.clone()
    for i, t in enumerate(ref.timesteps):
        out = fake_model(x_ref, t)
        x_ref = ref.step(out, t, x_ref).prev_sample
        t_next = torch.full((3,), float(ref.timesteps[i + 1])) if i + 1 < len(ref.timesteps) else None
        x = ours.step(out, x, torch.full((3,), float(t)), t_next)
        torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)


def test_lcm_scheduler_step_is_boundary_scaled_x0_then_renoise():
    ref = LCMScheduler(**SD, original_inference_steps=4)
    ref.set_timesteps(4)
    assert ref.timesteps.tolist() == [999, 749, 499, 249]
    ours = NoiseSchedule.from_scheduler_config(ref.config)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(ref.timesteps):
        out = fake_model(x, t)
        g = torch.Generator().manual_seed(10 + i)
        step = ref.step(out, t, x, generator=g)
        tt = torch.full((2,), int(t))
        x0, _ = ours.to_x0_eps(out, x, tt)
        c_skip, c_out = ours.boundary_scalings(tt)
        denoised = (c_out[:, None] * x0 + c_skip[:, None] * x).float()
        torch.testing.assert_close(denoised, step.denoised, atol=1e-5, rtol=1e-5)
        if i + 1 < len(ref.timesteps):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i))
            expected = ours.add_noise(denoised, noise, torch.full((2,), int(ref.timesteps[i + 1])))
            torch.testing.assert_close(expected, step.prev_sample, atol=1e-5, rtol=1e-5)
        x = step.prev_sample


def test_add_noise_and_conversions_roundtrip():
    ref = DDPMScheduler(**SD, prediction_type="v_prediction")
    ours = NoiseSchedule.from_scheduler_config(ref.config)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0, 10, 500, 999])
    x_t = ours.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, ref.add_noise(x0, eps, t), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.from_x0_eps(x0, eps, t), ref.get_velocity(x0, eps, t), atol=1e-6, rtol=1e-5)
    for kind in ("epsilon", "v_prediction", "sample"):
        out = ours.from_x0_eps(x0, eps, t, kind)
        x0_hat, eps_hat = ours.to_x0_eps(out, x_t, t, kind, dtype=torch.float64)
        torch.testing.assert_close(x0_hat.float(), x0, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(eps_hat.float(), eps, atol=2e-4, rtol=1e-4)
    flow = NoiseSchedule.flow(3.0)
    tf = torch.tensor([1.0, 250.0, 700.0, 1000.0])
    x_t = flow.add_noise(x0, eps, tf)
    x0_hat, eps_hat = flow.to_x0_eps(flow.from_x0_eps(x0, eps, tf), x_t, tf)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)


def test_timestep_sampling_ranges():
    vp = NoiseSchedule.vp()
    t = vp.sample_timesteps(20000, 0.02, 0.98, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 20 and int(t.max()) == 980  # DMD's [20, 980]
    flow = NoiseSchedule.flow(3.0)
    tf = flow.sample_timesteps(20000, 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    assert 0 <= float(tf.min()) and float(tf.max()) <= 1000
    assert float(tf.median()) > 600  # shift 3 puts most mass at high noise: median sigma = 0.75
    with pytest.raises(ValueError, match="fraction range"):
        vp.sample_timesteps(4, 0.5, 0.2)


def test_half_log_snr_matches_dpm_solver_and_closed_forms():
    """lambda_t = log(alpha_t / sigma_t): diffusers' DPMSolverMultistepScheduler.lambda_t on the VP grid (float32
    there, float64 here), the Karras sigma -log(sigma) between grid points, log((1 - s) / s) for flow."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(**SD)
    ours = NoiseSchedule.from_scheduler_config(ref.config)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(ours.half_log_snr(t), ref.lambda_t[t].double(), atol=1e-5, rtol=1e-5)
    half = torch.tensor([499.5])  # alpha/sigma = 1/k with k the linearly interpolated Karras sigma
    k = (((1 - ref.alphas_cumprod[499:501].double()) / ref.alphas_cumprod[499:501].double()) ** 0.5).mean()
    torch.testing.assert_close(ours.half_log_snr(half), -k.log().reshape(1), atol=1e-12, rtol=1e-12)
    flow = NoiseSchedule.flow(3.0)
    t = torch.tensor([0.0, 100.0, 500.0, 1000.0], dtype=torch.float64)
    s = t / 1000
    torch.testing.assert_close(flow.half_log_snr(t), ((1 - s) / s).log())  # +inf at clean data, -inf at noise


def test_to_flow_maps_a_vp_state_onto_the_straight_interpolation_and_ddim_onto_euler():
    """Closed form (InstaFlow's change of variables): x_t = alpha x0 + sigma eps becomes z = (1 - s) x0 + s eps with
    s = sigma / (alpha + sigma), and a DDIM step t -> t' of the VP model is the Euler step z' = z + (s' - s) u with
    velocity u = eps_hat - x0_hat. Flow schedules are left as they are."""
    vp = NoiseSchedule.vp()
    x0, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t, t_next = torch.tensor([999, 700, 300, 20]), torch.tensor([800, 500, 100, 0])
    z, s = vp.to_flow(vp.add_noise(x0, eps, t), t)
    torch.testing.assert_close(z.double(), (1 - s[:, None]) * x0 + s[:, None] * eps, atol=1e-6, rtol=1e-6)
    out = fake_model(vp.add_noise(x0, eps, t).float(), 500)  # any eps-prediction
    x_t = vp.add_noise(x0, eps, t).float()
    x0_hat, eps_hat = vp.to_x0_eps(out, x_t, t)
    z_next, s_next = vp.to_flow(vp.step(out, x_t, t, t_next), t_next)
    euler = z + (s_next - s)[:, None].float() * (eps_hat - x0_hat)
    torch.testing.assert_close(z_next, euler, atol=1e-5, rtol=1e-5)
    flow = NoiseSchedule.flow(3.0)
    tf = torch.tensor([1000.0, 640.0, 210.0, 3.0])
    zf, sf = flow.to_flow(x_t, tf)
    torch.testing.assert_close(zf, x_t)
    torch.testing.assert_close(sf, tf.double() / 1000)
