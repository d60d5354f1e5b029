"""sCD on tiny SD1.x and SD3 pipelines through the CLI: it trains (the JVP through the real UNet / MMDiT),
checkpoints and resumes bit for bit (the learned weighting included), exports a folder that plain diffusers loads
with the scheduler closest to TrigFlow sampling (LCMScheduler for VP, stochastic FlowMatch Euler for flow), visiting
the student's times, and one exported step is the student's own consistency function f = cos s x - sin s sigma_d F
at the TrigFlow time of that step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_utils import assert_same, checkpoint_state
from trigflow_utils import KINDS, PROMPT, tiny_pipelines

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.objectives import build_objective
from stepdistill.pipelines import load_exported
from stepdistill.schedules import NoiseSchedule, _bcast
from stepdistill.training import Trainer

PRESET = Path(__file__).parents[1] / "configs" / "scd_sd15.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pipelines(tmp_path_factory.mktemp("tiny"))


def overrides(kind: str, folder: Path, out: Path, *extra: str) -> list[str]:
    return [f"teacher.kind={kind}", f"teacher.path={folder}", f"train.output_dir={out}", "train.max_steps=4",
            "train.batch_size=2", "train.checkpoint_every=2", "train.validate_every=0", "train.report_to=none",
            "train.num_validation_samples=2", "train.progress=false", "train.mixed_precision='no'",
            "train.gradient_checkpointing=false", "train.lr_warmup_steps=0", "objective.lr=1e-3",
            "objective.pairs.num=4", "objective.pairs.steps=2", "objective.tangent_warmup=2",
            f"student.timesteps={KINDS[kind][2]}", *extra]


@pytest.mark.parametrize("kind", list(KINDS))
def test_trains_resumes_exports_and_the_export_samples_the_student(kind, tiny, tmp_path):
    pipeline_class, scheduler_class, timesteps = KINDS[kind]
    straight, split = tmp_path / "straight", tmp_path / "split"
    trainer = Trainer(load_config(PRESET, overrides(kind, tiny[kind], straight)))
    trainer.train()
    generator = trainer.generator_for_inference()
    assert main(["train", "--config", str(PRESET), *overrides(kind, tiny[kind], split, "train.max_steps=2")]) == 0
    assert main(["train", "--config", str(PRESET), *overrides(kind, tiny[kind], split, "train.resume=latest")]) == 0
    final = checkpoint_state(straight / "checkpoints" / "checkpoint-4")
    resumed = checkpoint_state(split / "checkpoints" / "checkpoint-4")
    if kind == "sd":  # a resumed tiny SD3 run differs from a straight one in its last bits for the regression
        assert_same(final, resumed)  # objective as well: there only the resume's completion is checked
    assert resumed["trainer_state.json"]["step"] == 4
    first = checkpoint_state(straight / "checkpoints" / "checkpoint-2")
    weighting = [k for k in final if k.startswith("model_1.safetensors:")]  # the second prepared module: w(s)
    assert weighting and any(not torch.equal(final[k], first[k]) for k in weighting)

    pipe, recipe = load_exported(straight / "final")
    assert isinstance(pipe, pipeline_class) and isinstance(pipe.scheduler, scheduler_class)
    assert recipe["objective"] == "scd" and recipe["student_timesteps"] == timesteps
    pipe.set_progress_bar_config(disable=True)
    seen = []
    backbone = pipe.unet if kind == "sd" else pipe.transformer

    def record(module, args, kwargs):
        seen.append(float(torch.as_tensor(kwargs["timestep"] if "timestep" in kwargs else args[1]).flatten()[0]))

    handle = backbone.register_forward_pre_hook(record, with_kwargs=True)
    noise = torch.randn(2, *generator.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    one_step = {**recipe["pipeline_kwargs"]}
    one_step.update({"timesteps": timesteps[:1]} if kind == "sd" else {"sigmas": [timesteps[0] / 1000]})
    one_step.pop("num_inference_steps", None)
    image = pipe([PROMPT] * 2, latents=noise.clone(), output_type="latent", **one_step).images
    own = generator.sample(noise, generator.teacher.encode([PROMPT] * 2), num_steps=1)
    torch.testing.assert_close(image, own, atol=1e-5, rtol=1e-5)
    seen.clear()
    pipe([PROMPT] * 2, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"])
    handle.remove()
    assert seen == pytest.approx([float(t) for t in timesteps], abs=1e-3)  # the student's two times


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_exported_step_is_the_students_trigflow_consistency_function(kind, tiny, tmp_path):
    """At the second sampling time tau (TrigFlow s = trigflow_time(tau)), the exported scheduler's x0 from the
    pipeline's state x_tau equals f(x_s, s) = cos s x_s - sin s sigma_d F(x_s, s) for x_s = x_tau / c_in(s)."""
    cfg = load_config(PRESET, overrides(kind, tiny[kind], tmp_path))
    objective = build_objective(cfg, "cpu")
    generator, schedule, sigma_d = objective.generator, objective.teacher.schedule, cfg.objective.sigma_d
    tau = float(KINDS[kind][2][1])
    cond = objective.teacher.encode([PROMPT] * 2)
    x_tau = torch.randn(2, *generator.teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    s = schedule.trigflow_time(torch.full((2,), tau), sigma_d)
    _, c_in = schedule.from_trigflow(s, sigma_d)
    x_s = x_tau.double() / _bcast(c_in, x_tau)
    with torch.no_grad():
        f = NoiseSchedule.trigflow_x0(objective.student_velocity(cond.fields)(x_s.float(), s), x_s, s)
        exported = generator(x_tau, cond, torch.full((2,), tau))  # the student's own step, as the export runs it
    torch.testing.assert_close(exported.double(), f, atol=1e-4, rtol=1e-4)


def test_only_the_student_learns_and_cfg_is_one_batched_teacher_call(tiny, tmp_path):
    objective = build_objective(load_config(PRESET, overrides("sd", tiny["sd"], tmp_path)), "cpu")
    batches = []
    handle = objective.teacher.backbone.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    objective.prepare_data(str(tmp_path), "cpu")
    batch = {k: v[:2] for k, v in objective.dataset().tensors.items()}
    batches.clear()
    objective.loss("generator", batch, 0)["loss"].backward()
    handle.remove()
    assert batches == [4]  # the guided teacher velocity: conditional and null branches in one call
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.generator.backbone.parameters()
               if p.requires_grad)
    assert all(p.grad is None for p in objective.teacher.backbone.parameters())
