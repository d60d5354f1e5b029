"""MeanFlow on tiny pipelines: the meanflow_sd3 preset trains on cached teacher samples, checkpoints and resumes (to
float32 rounding), and exports a folder that plain StableDiffusion3Pipeline loads and samples at the student's grid
(1 step at sigma 1; 2 steps at 1 and 0.5), equal to the two-time student's own MeanFlow steps; only the student (with
its interval embedding) gets gradients, through the JVP pass included. A VP teacher (tiny SD1.5) is distilled
directly, and through meanflow_digits' flow stage; its UNet export is a plain StableDiffusionPipeline."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from reliability_utils import assert_same, checkpoint_state

from stepdistill.cli import main
from stepdistill.config import TeacherConfig, load_config, load_config_tree
from stepdistill.objectives import build_objective
from stepdistill.objectives.continuous.meanflow_student import MeanFlowGenerator, TimeAndInterval
from stepdistill.pipelines import load_exported
from stepdistill.recipes import run_recipe
from stepdistill.teachers import load_teacher
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer

PRESET = Path(__file__).parents[1] / "configs" / "meanflow_sd3.yaml"
PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SD3 pipeline and its cache of 8 teacher samples, written before any run reads it."""
    root = tmp_path_factory.mktemp("tiny")
    folder = save_tiny_pipeline("sd3", root / "sd3")
    build_objective(load_config(PRESET, overrides(folder, root / "run")), "cpu").prepare_data(root / "run", "cpu")
    return folder


def overrides(folder: Path, out: Path, *extra: str) -> list[str]:
    return [f"teacher.path={folder}", f"train.output_dir={out}", "objective.pairs.num=8", "objective.pairs.steps=2",
            f"objective.pairs.dir={folder.parent / 'pairs'}", "objective.lr=1e-3", "train.max_steps=4",
            "train.batch_size=2", "train.checkpoint_every=2", "train.validate_every=0", "train.report_to=none",
            "train.num_validation_samples=2", "train.progress=false", "train.mixed_precision='no'",
            "train.gradient_checkpointing=false", "train.lr_warmup_steps=0", "train.ema_decay=0", *extra]


def exported_with_random_interval(tiny, tmp_path, run: str, *extra: str):
    """A one-step training run, its student's interval embedding set to random values (it starts at zero, which
    would hide a wrong fold), exported: (generator, export folder)."""
    trainer = Trainer(load_config(PRESET, overrides(tiny, tmp_path / run, *extra, "train.max_steps=1",
                                                    "train.checkpoint_every=0")))
    trainer.train()
    generator = trainer.generator_for_inference()
    with torch.no_grad():
        for p in generator.backbone.time_text_embed.timestep_embedder.interval.parameters():
            p.normal_(0, 0.1)
    return generator, trainer.objective.export(generator, tmp_path / "export")


def test_trains_resumes_and_the_plain_diffusers_export_samples_the_student(tiny, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    trainer = Trainer(load_config(PRESET, overrides(tiny, straight)))
    trainer.train()
    generator = trainer.generator_for_inference()
    assert isinstance(generator, MeanFlowGenerator) and generator.timesteps == [1000.0]
    Trainer(load_config(PRESET, overrides(tiny, split, "train.max_steps=2"))).train()
    Trainer(load_config(PRESET, overrides(tiny, split, "train.resume=latest"))).train()
    assert_same(checkpoint_state(straight / "checkpoints" / "checkpoint-2"),
                checkpoint_state(split / "checkpoints" / "checkpoint-2"))
    final, resumed = (checkpoint_state(run / "checkpoints" / "checkpoint-4") for run in (straight, split))
    # after the resume the losses are bitwise those of the straight run but the gradients agree only to float32
    # rounding (~1e-8 relative; reflow on this pipeline resumes bitwise): the weights agree to 1e-6
    assert final.keys() == resumed.keys()
    for k, v in final.items():
        if isinstance(v, torch.Tensor) and k.startswith("model"):
            torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=1e-5)
    key = "model.safetensors:time_text_embed.timestep_embedder.interval.linear_2.weight"
    assert final[key].abs().sum() > 0  # the zero-initialized interval embedding has learned

    plain = StableDiffusion3Pipeline.from_pretrained(str(straight / "final"))
    assert type(plain.transformer) is SD3Transformer2DModel
    assert isinstance(plain.scheduler, FlowMatchEulerDiscreteScheduler)
    assert not any(isinstance(m, TimeAndInterval) for m in plain.transformer.modules())
    loaded, recipe = load_exported(straight / "final")
    assert isinstance(loaded, StableDiffusion3Pipeline)
    assert recipe["pipeline_kwargs"] == {"sigmas": [1.0], "guidance_scale": 0.0}
    plain.set_progress_bar_config(disable=True)
    noise = torch.randn(len(PROMPTS), *generator.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    image = plain(PROMPTS, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    assert plain.scheduler.timesteps.tolist() == [1000.0]
    own = generator.sample(noise, generator.teacher.encode(PROMPTS))
    torch.testing.assert_close(image, own, atol=1e-4, rtol=1e-4)


def test_two_step_export_samples_at_one_and_one_half(tiny, tmp_path):
    """N = 2: the fold at h = T / 2 and the FlowMatch scheduler at sigmas [1, 0.5] are the student's 2-NFE sampler
    1 -> 0.5 -> 0 (with a non-zero interval embedding, so that the fold matters)."""
    assert main(["train", "--config", str(PRESET), *overrides(tiny, tmp_path / "run", "objective.sample_steps=2",
                                                              "train.max_steps=1", "train.checkpoint_every=0")]) == 0
    assert load_exported(tmp_path / "run" / "final")[1]["pipeline_kwargs"]["sigmas"] == [1.0, 0.5]
    generator, folder = exported_with_random_interval(tiny, tmp_path, "run2", "objective.sample_steps=2")
    pipe, recipe = load_exported(folder)
    assert recipe["pipeline_kwargs"] == {"sigmas": [1.0, 0.5], "guidance_scale": 0.0}
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(len(PROMPTS), *generator.teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    image = pipe(PROMPTS, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    assert pipe.scheduler.timesteps.tolist() == [1000.0, 500.0]
    own = generator.sample(noise, generator.teacher.encode(PROMPTS))
    torch.testing.assert_close(image, own, atol=1e-4, rtol=1e-4)
    assert (own - generator.sample(noise, generator.teacher.encode(PROMPTS), num_steps=1)).abs().max() > 1e-3


def test_only_the_student_gets_gradients(tiny, tmp_path):
    cfg = load_config(PRESET, overrides(tiny, tmp_path / "run"))
    objective = build_objective(cfg, "cpu")
    objective.prepare_data(tmp_path / "run", "cpu")  # the cached samples
    batch = {k: v[:2] for k, v in objective.dataset().tensors.items()}
    objective.loss("generator", batch, 0)["loss"].backward()
    student = objective.generator.backbone
    interval = student.time_text_embed.timestep_embedder.interval
    assert interval.linear_2.weight.grad.abs().sum() > 0
    assert student.proj_out.weight.grad.abs().sum() > 0
    for component in objective.teacher.pipe.components.values():
        if isinstance(component, torch.nn.Module) and component is not student:
            assert all(p.grad is None for p in component.parameters())


def test_vp_teacher_goes_through_a_flow_stage_and_the_unet_export_is_plain_diffusers(tmp_path):
    """meanflow_digits' recipe on a tiny SD1.5 pipeline: the `flow` stage makes the eps-UNet a velocity model, the
    `meanflow` stage distills it with the flow's export as teacher and as the student's start. The export is a plain
    StableDiffusionPipeline sampled at sigma 1; with a non-zero interval embedding the UNet's fold (into
    time_embedding.linear_2) gives the two-time student's own u(z, 0, 1) at T."""
    sd = save_tiny_pipeline("sd", tmp_path / "sd")
    tree = load_config_tree("configs/meanflow_digits.yaml", [
        f"teacher.path={sd}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
        "objective.pairs.num=4", "objective.pairs.steps=2", "train.num_validation_samples=2", "train.progress=false"])
    tree["recipe"][1]["set"].update({"train.max_steps": 2, "objective.pairs": {"num": 4, "steps": 2}})
    assert [r["stage"] for r in run_recipe(tree)] == ["flow", "meanflow"]
    final = tmp_path / "run" / "meanflow" / "final"
    plain = StableDiffusionPipeline.from_pretrained(str(final))
    assert type(plain.unet) is UNet2DConditionModel and isinstance(plain.scheduler, FlowMatchEulerDiscreteScheduler)
    _, recipe = load_exported(final)
    assert recipe["pipeline_kwargs"] == {"sigmas": [1.0], "guidance_scale": 0.0}

    flow = load_teacher(TeacherConfig(kind="auto", path=str(tmp_path / "run" / "flow" / "final")))
    generator = MeanFlowGenerator(flow.build_backbone(), flow, 1, flow.schedule)
    with torch.no_grad():
        for p in generator.backbone.time_embedding.interval.parameters():
            p.normal_(0, 0.1)
    noise = torch.randn(2, *flow.sample_shape, generator=torch.Generator().manual_seed(2))
    cond = flow.encode(PROMPTS)
    folded = generator.folded()
    assert type(folded.backbone.time_embedding).__name__ == "TimestepEmbedding"
    torch.testing.assert_close(folded.sample(noise, cond), generator.sample(noise, cond), atol=1e-5, rtol=1e-5)


def test_vp_teacher_distilled_directly_into_a_flow_student(tmp_path):
    """SD1.5 as the MeanFlow teacher itself (read at the flow state through TrigFlow): a flow student on SD's time
    axis whose export, a plain StableDiffusionPipeline with FlowMatchEulerDiscreteScheduler at sigma 1, samples
    what the two-time student samples in one step."""
    sd = save_tiny_pipeline("sd", tmp_path / "sd")
    cfg = load_config(PRESET, [*overrides(sd, tmp_path / "run", "teacher.kind=sd", "student.schedule=flow",
                                          "train.max_steps=2", "train.checkpoint_every=0"),
                               f"objective.pairs.dir={tmp_path / 'pairs'}"])
    trainer = Trainer(cfg)
    result = trainer.train()
    generator = trainer.generator_for_inference()
    assert trainer.objective.teacher.schedule.kind == "vp" and generator.schedule.kind == "flow"
    plain = StableDiffusionPipeline.from_pretrained(str(result.final_dir))
    assert isinstance(plain.scheduler, FlowMatchEulerDiscreteScheduler)
    _, recipe = load_exported(result.final_dir)
    plain.set_progress_bar_config(disable=True)
    noise = torch.randn(len(PROMPTS), *generator.teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    image = plain(PROMPTS, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    torch.testing.assert_close(image, generator.sample(noise, generator.teacher.encode(PROMPTS)), atol=1e-4,
                               rtol=1e-4)


def test_lora_student_exports_merged_weights_only(tiny, tmp_path):
    """The interval embedding and its fold live outside a LoRA adapter, so a LoRA student's export holds the merged
    transformer and no adapter folder; it samples what the student samples."""
    generator, folder = exported_with_random_interval(tiny, tmp_path, "run", "student.kind=lora",
                                                      "student.lora_rank=4")
    assert not (folder / "lora").exists()
    pipe, recipe = load_exported(folder)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(len(PROMPTS), *generator.teacher.sample_shape, generator=torch.Generator().manual_seed(4))
    image = pipe(PROMPTS, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    torch.testing.assert_close(image, generator.sample(noise, generator.teacher.encode(PROMPTS)), atol=1e-4,
                               rtol=1e-4)
