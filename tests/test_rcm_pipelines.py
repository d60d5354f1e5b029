"""rCM on tiny SD1.x and SD3 pipelines through the CLI (configs/rcm_sd3.yaml with the teacher swapped): the sCD
warm-up, then student steps with the DMD term and critic steps; it checkpoints and resumes (bit for bit on SD1.x,
the critic and its optimizer included), and the export is the student alone, a pipeline folder plain diffusers
loads with the scheduler closest to TrigFlow sampling, visiting the student's times."""
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

PRESET = Path(__file__).parents[1] / "configs" / "rcm_sd3.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pipelines(tmp_path_factory.mktemp("tiny"))


def overrides(kind: str, folder: Path, out: Path, *extra: str) -> list[str]:
    """Warm-up 1 step, then a student step every 2nd step: steps 1 and 3 train the student (sCD + DMD), step 2 the
    critic."""
    return [f"teacher.kind={kind}", f"teacher.path={folder}", f"train.output_dir={out}", "train.max_steps=4",
            "train.batch_size=2", "train.checkpoint_every=2", "train.validate_every=0", "train.report_to=none",
            "train.num_validation_samples=2", "train.progress=false", "train.mixed_precision='no'",
            "train.gradient_checkpointing=false", "train.lr_warmup_steps=0", "objective.lr=1e-3",
            "objective.critic_lr=1e-3",
            "objective.pairs.num=4", "objective.pairs.steps=2", f"objective.pairs.dir={out.parent / 'pairs'}",
            "objective.tangent_warmup=1", "objective.student_update_freq=2", f"student.timesteps={KINDS[kind][2]}",
            *extra]


def test_phases_after_the_warm_up_train_the_student_with_dmd_and_the_critic_alone(tiny, tmp_path):
    objective = build_objective(load_config(PRESET, overrides("sd", tiny["sd"], tmp_path)), "cpu")
    assert [objective.phases(s) for s in range(4)] == [["generator"], ["generator"], ["critic"], ["generator"]]
    objective.prepare_data(str(tmp_path), "cpu")
    batch = {k: v[:2] for k, v in objective.dataset().tensors.items()}
    losses = objective.loss("generator", batch, 1)
    assert {"scd", "dmd"} <= losses.keys()
    losses["loss"].backward()
    assert all(p.grad is None for p in objective.critic.parameters())
    assert all(p.grad is None for p in objective.teacher.backbone.parameters())
    objective.zero_grad(set_to_none=True)
    objective.loss("critic", batch, 2)["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.critic.parameters())
    assert all(p.grad is None for p in objective.generator.backbone.parameters())


@pytest.mark.parametrize("kind", list(KINDS))
def test_trains_resumes_and_exports_the_student_alone(kind, tiny, tmp_path):
    pipeline_class, scheduler_class, timesteps = KINDS[kind]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--config", str(PRESET), *overrides(kind, tiny[kind], straight)]) == 0
    assert main(["train", "--config", str(PRESET), *overrides(kind, tiny[kind], split, "train.max_steps=2")]) == 0
    assert main(["train", "--config", str(PRESET), *overrides(kind, tiny[kind], split, "train.resume=latest")]) == 0
    final = checkpoint_state(straight / "checkpoints" / "checkpoint-4")
    resumed = checkpoint_state(split / "checkpoints" / "checkpoint-4")
    if kind == "sd":  # tiny SD3 resumes differ in their last bits (as for sCD and regression): completion only
        assert_same(final, resumed)
    assert resumed["trainer_state.json"]["step"] == 4
    first = checkpoint_state(straight / "checkpoints" / "checkpoint-2")
    critic = [k for k in final if k.startswith("model_1.safetensors:")]  # the second prepared module: the critic
    assert critic and any(not torch.equal(final[k], first[k]) for k in critic)  # trained at step 2

    pipe, recipe = load_exported(straight / "final")
    assert isinstance(pipe, pipeline_class) and isinstance(pipe.scheduler, scheduler_class)
    assert recipe["objective"] == "rcm" and recipe["student_timesteps"] == timesteps
    backbone = pipe.unet if kind == "sd" else pipe.transformer
    n_student = sum(p.numel() for p in backbone.parameters())
    n_folder = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters())
    teacher = load_config(PRESET, overrides(kind, tiny[kind], tmp_path / "t"))
    reference = build_objective(teacher, "cpu").teacher.pipe
    assert n_folder == sum(p.numel() for m in reference.components.values() if isinstance(m, torch.nn.Module)
                           for p in m.parameters())  # the teacher's components with the student's backbone
    assert n_student > 0
    pipe.set_progress_bar_config(disable=True)
    seen = []
    handle = backbone.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float(torch.as_tensor(
            kwargs["timestep"] if "timestep" in kwargs else args[1]).flatten()[0])), with_kwargs=True)
    pipe([PROMPT] * 2, output_type="latent", **recipe["pipeline_kwargs"])
    handle.remove()
    assert seen == pytest.approx([float(t) for t in timesteps], abs=1e-3)
