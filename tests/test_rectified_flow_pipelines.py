"""Reflow on tiny real pipelines: a VP teacher (SD1.5) with a flow student and a flow teacher (SD3) train a round,
export a multistep folder that plain diffusers loads and samples at the right timesteps, and one recipe run makes
the export of round 1 the teacher of round 2, then distills round 2 into one step."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

from stepdistill.config import TeacherConfig, load_config, load_config_tree
from stepdistill.data import DEFAULT_PROMPTS, PairDataset
from stepdistill.pipelines import load_exported
from stepdistill.recipes import run_recipe
from stepdistill.schedules import NoiseSchedule
from stepdistill.students import FlowGenerator
from stepdistill.teachers import load_teacher
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer

PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "sd3")}


def reflow_overrides(teacher, out, *extra):
    return ["objective.name=reflow", "teacher.kind=auto", f"teacher.path={teacher}", "objective.pairs.num=8",
            "objective.pairs.steps=2", "objective.pairs.guidance=2.0", "objective.lr=1.0e-3",
            "objective.sample_steps=3", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4",
            "train.checkpoint_every=0", "train.report_to=none", "train.num_validation_samples=2",
            "train.progress=false", "train.mixed_precision='no'", *extra]


def sample_pipeline(pipe, recipe, noise, **kwargs):
    args = {**recipe["pipeline_kwargs"], **kwargs}
    return pipe(PROMPTS, latents=noise.clone(), output_type="latent", **args).images


def test_sd15_flow_student_round_exports_a_multistep_flow_that_plain_diffusers_samples(folders, tmp_path):
    """InstaFlow's setting: SD's eps-UNet, copied, is trained as a velocity model on SD's time axis. The export is a
    StableDiffusionPipeline with FlowMatchEulerDiscreteScheduler (the student's shift) whose config records
    init_noise_sigma = 1, which StableDiffusionPipeline.__call__ reads and that scheduler lacks: plain diffusers
    loads and samples it as it is, and equals the student's own N-step Euler sampler, CFG included."""
    cfg = load_config(None, reflow_overrides(folders["sd"], tmp_path / "rf", "student.schedule=flow",
                                             "objective.sample_guidance=1.5", "objective.cond_dropout=0.5"))
    trainer = Trainer(cfg)
    result = trainer.train()
    generator = trainer.generator_for_inference()
    assert isinstance(generator, FlowGenerator) and generator.schedule.kind == "flow"

    plain = StableDiffusionPipeline.from_pretrained(str(result.final_dir))
    assert isinstance(plain.scheduler, FlowMatchEulerDiscreteScheduler)
    assert plain.scheduler.config.init_noise_sigma == 1.0
    # the exported scheduler names the schedule the student was trained on
    assert NoiseSchedule.from_scheduler_config(plain.scheduler.config) == generator.schedule

    pipe, recipe = load_exported(result.final_dir)
    assert recipe["pipeline_kwargs"] == {"num_inference_steps": 3, "guidance_scale": 1.5}
    assert recipe["sampling"]["any_num_steps"]
    assert "`init_noise_sigma` is not a `FlowMatchEulerDiscreteScheduler` argument" in \
        (result.final_dir / "README.md").read_text()  # the model card explains diffusers' warning
    teacher = generator.teacher
    noise = torch.randn(len(PROMPTS), *teacher.sample_shape)
    cond = teacher.encode(PROMPTS)
    images = sample_pipeline(pipe, recipe, noise)
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(generator.timesteps)
    torch.testing.assert_close(images, generator.sample(noise, cond), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sample_pipeline(plain, recipe, noise), images, atol=1e-5, rtol=1e-5)
    # one Euler step of the export is the student's own step from pure noise: x0 = z - u(z, T)
    one = sample_pipeline(pipe, recipe, noise, num_inference_steps=1)
    assert pipe.scheduler.timesteps.tolist() == [1000.0]
    velocity = teacher.guided_output(noise, torch.full((2,), 1000.0), cond, 1.5, net=generator.backbone)
    torch.testing.assert_close(one, noise - velocity, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one, generator.sample(noise, cond, num_steps=1), atol=1e-4, rtol=1e-4)


def test_sd3_flow_teacher_round_keeps_its_schedule_and_samples_with_plain_diffusers(folders, tmp_path):
    """A flow teacher (SD3, shift 3) needs no new schedule: the student is a flow on the teacher's own schedule,
    and StableDiffusion3Pipeline samples the exported FlowMatch scheduler as it is."""
    cfg = load_config(None, reflow_overrides(folders["sd3"], tmp_path / "rf"))
    trainer = Trainer(cfg)
    result = trainer.train()
    generator = trainer.generator_for_inference()
    assert generator.schedule.kind == "flow" and generator.schedule.shift == 3.0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / "stepdistill.json").read_text())
    assert pipe.scheduler.config.shift == 3.0 and recipe["pipeline_kwargs"]["num_inference_steps"] == 3
    noise = torch.randn(len(PROMPTS), *generator.teacher.sample_shape)
    for steps in (1, 3):
        images = sample_pipeline(pipe, recipe, noise, num_inference_steps=steps)
        assert pipe.scheduler.timesteps.tolist() == pytest.approx(generator.schedule.inference_timesteps(steps),
                                                                  abs=1e-3)
        expected = generator.sample(noise, generator.teacher.encode(PROMPTS), num_steps=steps)
        torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)


def test_one_recipe_run_makes_round_one_the_teacher_of_round_two_then_distills_it(folders, tmp_path):
    """rf1 (SD -> flow), rf2 (teacher: rf1's export), distill (regression on rf2's pairs, one step at s = 1): the
    pairs of rf2 are rf1's own Euler ODE endpoints, and the one-step export samples with plain diffusers."""
    tree = load_config_tree(None, reflow_overrides(folders["sd"], tmp_path, "student.schedule=flow"))
    tree["recipe"] = [
        {"name": "rf1"},
        {"name": "rf2", "set": {"teacher.path": "${stages.rf1.final}", "student.schedule": "teacher"}},
        {"name": "distill", "set": {"objective.name": "regression", "objective.pairs": {"num": 8, "steps": 3},
                                    "teacher.path": "${stages.rf2.final}", "student.schedule": "teacher",
                                    "student.timesteps": [1000]}},
    ]
    results = run_recipe(tree)
    assert [r["stage"] for r in results] == ["rf1", "rf2", "distill"]
    rf1 = load_teacher(TeacherConfig(kind="auto", path=str(tmp_path / "rf1" / "final")))
    assert rf1.schedule == NoiseSchedule.flow(1.0) and rf1.schedule.prediction_type == "flow"
    pairs = PairDataset(tmp_path / "rf2" / "pairs")
    meta = json.loads((tmp_path / "rf2" / "pairs" / "meta.json").read_text())
    assert meta["recipe"]["teacher"] == rf1.identity and meta["recipe"]["sampler"] == "flow Euler"
    # a cached endpoint is rf1's 2-step Euler ODE at CFG 2 from the cached noise
    noise, index = pairs.tensors["noise"][:2], pairs.tensors["cond_index"][:2]
    cond = rf1.encode([DEFAULT_PROMPTS[int(i)] for i in index])
    torch.testing.assert_close(rf1.sample(noise, cond, 2, 2.0), pairs.tensors["x0"][:2], atol=1e-4, rtol=1e-4)

    pipe, recipe = load_exported(tmp_path / "distill" / "final")
    assert recipe["pipeline_kwargs"] == {"sigmas": [1.0], "guidance_scale": 0.0}
    noise = torch.randn(2, *rf1.sample_shape)
    images = sample_pipeline(pipe, recipe, noise)
    assert pipe.scheduler.timesteps.tolist() == [1000.0]
    student = load_teacher(TeacherConfig(kind="auto", path=str(tmp_path / "distill" / "final")))
    one_step = student.predict(noise, torch.full((2,), 1000.0), student.encode(PROMPTS)).x0  # z - u(z, T)
    torch.testing.assert_close(images, one_step, atol=1e-4, rtol=1e-4)
