"""Export of students of diffusers teachers, and the end-to-end run: train, checkpoint, resume, export, reload."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from torch.utils.data import DataLoader

from stepdistill.config import StudentConfig, TeacherConfig, load_config
from stepdistill.export import export_student
from stepdistill.objectives import build_objective
from stepdistill.pipelines import RECIPE_FILE, load_exported
from stepdistill.students import build_student
from stepdistill.teachers import load_teacher
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "sdxl", "pixart", "sd3", "flux")}


def _overrides(folder, out, max_steps, timesteps, extra=()):
    return ["teacher.kind=auto", f"teacher.path={folder}", "student.kind=copy", f"student.timesteps={timesteps}",
            "objective.name=regression", "objective.pairs.num=8", "objective.pairs.steps=2",
            "objective.pairs.guidance=2.0", "objective.lr=1.0e-3", f"train.output_dir={out}",
            f"train.max_steps={max_steps}", "train.batch_size=4", "train.checkpoint_every=2", "train.report_to=none",
            "train.num_validation_samples=2", "train.progress=false", "train.mixed_precision='no'", *extra]


@pytest.mark.parametrize("kind,pipeline_class,timesteps", [
    ("sd", StableDiffusionPipeline, [999]),  # a uniform grid: num_inference_steps=1
    ("sdxl", StableDiffusionXLPipeline, [399]),  # DMD2's SDXL one-step trick: explicit timesteps=[399]
])
def test_train_resume_export_and_reload_with_plain_diffusers(kind, pipeline_class, timesteps, folders, tmp_path):
    out = tmp_path / "run"
    first = Trainer(load_config(None, _overrides(folders[kind], out, 2, timesteps))).train()
    assert first.step == 2 and (out / "checkpoints" / "checkpoint-2").is_dir()

    trainer = Trainer(load_config(None, _overrides(folders[kind], out, 3, timesteps, ["train.resume=latest"])))
    result = trainer.train()
    assert result.step == 3 and (out / "checkpoints" / "checkpoint-3").is_dir()
    optimizer = trainer.optimizers["generator"]
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {3}, "the resumed run continued the optimizer state of checkpoint-2"

    generator = trainer.generator_for_inference()
    teacher = generator.teacher
    moved = [not torch.equal(p, q) for p, q in zip(generator.backbone.parameters(), teacher.backbone.parameters())]
    assert any(moved), "training changed the student, so the comparison below is not teacher vs teacher"

    pipe = pipeline_class.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / RECIPE_FILE).read_text())
    assert isinstance(pipe.scheduler, LCMScheduler) and recipe["student_timesteps"] == timesteps
    assert recipe["guidance_scale"] == 0.0 and (result.final_dir / "README.md").is_file()
    noise = torch.randn(2, *teacher.sample_shape)
    images = pipe([PROMPT] * 2, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    assert pipe.scheduler.timesteps.tolist() == timesteps
    expected = generator.sample(noise, teacher.encode([PROMPT] * 2))
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)


def _teacher(folder):
    return load_teacher(TeacherConfig(kind="auto", path=str(folder)), "cpu")


def test_k_step_export_reproduces_the_students_renoising_rule(folders, tmp_path):
    """[999, 749, 499, 249] comes out of LCMScheduler.set_timesteps(4); its fresh-noise re-noising between steps
    is Generator.sample's rule, so with the same RNG stream the pipeline equals the student exactly."""
    teacher = _teacher(folders["sd"])
    generator = build_student(teacher, StudentConfig(timesteps=[999, 749, 499, 249]))
    with torch.no_grad():
        for p in generator.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pipe, recipe = load_exported(export_student(generator, teacher, tmp_path / "export"))
    assert recipe["pipeline_kwargs"] == {"num_inference_steps": 4, "guidance_scale": 0.0}
    assert pipe.scheduler.config.original_inference_steps == 1000  # every timestep on its grid: 50 steps allowed
    noise = torch.randn(1, *teacher.sample_shape)
    torch.manual_seed(7)
    images = pipe(PROMPT, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    torch.manual_seed(7)
    expected = generator.sample(noise, teacher.encode([PROMPT]))
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=1e-4)
    torch.manual_seed(8)
    other = generator.sample(noise, teacher.encode([PROMPT]))
    assert (other - expected).abs().max() > 1e-3  # the comparison depends on the re-noising draws


def test_lora_student_exports_merged_backbone_and_loadable_lora(folders, tmp_path):
    teacher = _teacher(folders["sd"])
    generator = build_student(teacher, StudentConfig(kind="lora", lora_rank=4, lora_alpha=8.0))
    with torch.no_grad():
        for name, p in generator.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder = export_student(generator, teacher, tmp_path / "export")
    pipe, recipe = load_exported(folder)
    assert recipe["lora"] == "lora" and not any("lora" in k for k in pipe.unet.state_dict())
    noise = torch.randn(1, *teacher.sample_shape)
    expected = generator.sample(noise, teacher.encode([PROMPT]))
    teacher_only = teacher.sample(noise, teacher.encode([PROMPT]), num_steps=1)
    assert (expected - teacher_only).abs().max() > 1e-3
    merged = pipe(PROMPT, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    # the LoRA file on the teacher's own pipeline (with the exported scheduler) gives the same student
    base = StableDiffusionPipeline.from_pretrained(str(folders["sd"]))
    base.scheduler = pipe.scheduler
    base.load_lora_weights(str(folder / recipe["lora"]))
    with_lora = base(PROMPT, latents=noise.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    torch.testing.assert_close(with_lora, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux"])
def test_regression_step_on_transformer_teachers_and_one_step_export(kind, folders, tmp_path):
    timesteps = "[999]"
    cfg = load_config(None, _overrides(folders[kind], tmp_path / "run", 1, timesteps))
    objective = build_objective(cfg, "cpu")
    objective.prepare_data(str(tmp_path / "run"), "cpu")
    batch = next(iter(DataLoader(objective.dataset(), batch_size=2)))
    loss = objective.loss("generator", batch, 0)["loss"]
    loss.backward()
    grads = [p.grad for p in objective.generator.backbone.parameters()]
    assert torch.isfinite(loss) and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in objective.teacher.backbone.parameters())

    generator, teacher = objective.generator, objective.teacher
    pipe, recipe = load_exported(export_student(generator, teacher, tmp_path / "export"))
    noise = torch.randn(1, *teacher.sample_shape)

    def pack(x):  # FluxPipeline takes and returns packed 2x2 latents
        return FluxPipeline._pack_latents(x, 1, *teacher.sample_shape) if kind == "flux" else x

    extra = {"use_resolution_binning": False} if kind == "pixart" else {}  # 16px is not a PixArt bin
    if kind == "flux":  # its default size is 128 latent pixels, not the VAE's
        extra = {"height": 16, "width": 16}
    images = pipe(PROMPT, latents=pack(noise.clone()), output_type="latent", **recipe["pipeline_kwargs"],
                  **extra).images
    expected = generator.sample(noise, teacher.encode([PROMPT]))
    torch.testing.assert_close(images, pack(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["configs/regression_sd15.yaml", "configs/regression_sdxl.yaml"])
def test_presets_are_valid_configs(preset):
    cfg = load_config(Path(__file__).parents[1] / preset)
    assert cfg.teacher.kind in ("sd", "sdxl") and "/" in cfg.teacher.path and cfg.objective.name == "regression"
