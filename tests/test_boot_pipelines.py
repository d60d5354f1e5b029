"""BOOT on tiny SD1.x and SDXL pipelines through the CLI: it trains, checkpoints and resumes bit for bit, exports a
folder that plain diffusers loads, and that folder's one-step image (EulerDiscreteScheduler at timestep 0,
prediction_type sample) equals the student's own one-step sample on the same noise; only the student learns."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from reliability_utils import assert_same, checkpoint_state

from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.objectives import build_objective
from stepdistill.pipelines import load_exported
from stepdistill.students.signal import SignalGenerator
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer

PRESET = Path(__file__).parents[1] / "configs" / "boot_sd15.yaml"
PROMPT = "a photo of a cat"
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "sdxl")}


def overrides(kind: str, folder: Path, out: Path, *extra: str) -> list[str]:
    return [f"teacher.kind={kind}", f"teacher.path={folder}", f"train.output_dir={out}", "train.max_steps=4",
            "train.batch_size=2", "train.checkpoint_every=2", "train.validate_every=0", "train.report_to=none",
            "train.num_validation_samples=2", "train.progress=false", "train.mixed_precision='no'",
            "train.gradient_checkpointing=false", "train.lr_warmup_steps=0", "objective.lr=1e-3", *extra]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_trains_resumes_exports_and_the_export_samples_the_student(kind, tiny, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    trainer = Trainer(load_config(PRESET, overrides(kind, tiny[kind], straight)))
    trainer.train()
    generator = trainer.generator_for_inference()
    assert main(["train", "--config", str(PRESET), *overrides(kind, tiny[kind], split, "train.max_steps=2")]) == 0
    assert main(["train", "--config", str(PRESET),
                 *overrides(kind, tiny[kind], split, "train.resume=latest")]) == 0
    final = checkpoint_state(straight / "checkpoints" / "checkpoint-4")
    assert_same(final, checkpoint_state(split / "checkpoints" / "checkpoint-4"))
    first = checkpoint_state(straight / "checkpoints" / "checkpoint-2")
    assert not torch.equal(final["model.safetensors:conv_in.weight"], first["model.safetensors:conv_in.weight"])

    pipe, recipe = load_exported(straight / "final")
    assert isinstance(pipe, PIPELINES[kind]) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.prediction_type == "sample" and recipe["sampling"]["generator"] == "SignalGenerator"
    assert recipe["pipeline_kwargs"] == {"timesteps": [0], "guidance_scale": 0.0}
    assert "BOOT signal-ODE student" in (straight / "final" / "README.md").read_text()
    exported = {f"model.safetensors:{k}": v for k, v in pipe.unet.state_dict().items()}
    assert_same({k: final[k] for k in exported}, exported)  # the export holds the trained weights

    pipe.set_progress_bar_config(disable=True)
    eps = torch.randn(2, *generator.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    image = pipe([PROMPT] * 2, latents=eps.clone(), output_type="latent", **recipe["pipeline_kwargs"]).images
    own = generator.sample(eps, generator.teacher.encode([PROMPT] * 2))
    torch.testing.assert_close(image, own, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(own, eps, atol=1e-2)  # the signal, not the noise it reads


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_only_the_student_gets_gradients_and_cfg_is_one_batched_teacher_call(kind, tiny, tmp_path):
    objective = build_objective(load_config(PRESET, overrides(kind, tiny[kind], tmp_path)), "cpu")
    assert isinstance(objective.generator, SignalGenerator)
    batches = []
    handle = objective.teacher.backbone.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    objective.loss("generator", {"cond_index": torch.tensor([0, 1])}, 0)["loss"].backward()
    handle.remove()
    assert batches == [8]  # [x_t; eps] for the bootstrap and the boundary, conditional and null branches
    student = objective.generator.backbone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)
    for component in objective.teacher.pipe.components.values():
        if isinstance(component, torch.nn.Module) and component is not student:
            assert all(p.grad is None for p in component.parameters())
