"""Adding an objective takes its own code and one registration: an objective defined only in this file trains
through the real CLI, checkpoints, resumes, exports a folder that plain diffusers loads, and is planned by
`stepdistill plan`, with no edit anywhere else."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from diffusers import DiffusionPipeline
from reliability_utils import assert_same, checkpoint_state

from stepdistill.cli import main
from stepdistill.objectives import REGISTRY, register
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.teachers.tiny import save_tiny_pipeline


@dataclass
class OneStepDenoiseConfig(ObjectiveConfig):
    name: str = "one_step_denoise_test"
    lr: float = 1e-3
    guidance: float = 2.0


class OneStepDenoise(Objective):
    """Test-only: the student's one-step output from pure noise regresses onto the teacher's guided x0 of the
    same noise (a one-step DDIM teacher), data-free."""

    name = "one_step_denoise_test"
    config_class = OneStepDenoiseConfig

    def optimizer_groups(self):
        return [OptimizerGroup("generator", "generator.backbone", self.config.lr)]

    def loss(self, phase, batch, step):
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        z = self.noise(len(cond))
        t = self.generator.time(0, z)
        with torch.no_grad():
            target = self.teacher.predict(z, t, cond, self.config.guidance).x0
        return {"loss": torch.nn.functional.mse_loss(self.generator(z, cond, t), target)}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    register(OneStepDenoise)
    yield save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny") / "sd")
    REGISTRY.pop(OneStepDenoise.name)


def args(teacher, out, *extra):
    return ["objective.name=one_step_denoise_test", "teacher.kind=sd", f"teacher.path={teacher}",
            f"train.output_dir={out}", "train.batch_size=2", "train.checkpoint_every=2", "train.report_to=none",
            "train.progress=false", "train.num_validation_samples=2", "train.mixed_precision='no'", *extra]


def test_an_objective_from_outside_the_package_trains_resumes_exports_and_is_planned(tiny_sd, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *args(tiny_sd, straight, "train.max_steps=4")]) == 0
    assert main(["train", *args(tiny_sd, split, "train.max_steps=2")]) == 0
    assert main(["train", *args(tiny_sd, split, "train.max_steps=4", "train.resume=latest")]) == 0
    assert_same(checkpoint_state(straight / "checkpoints" / "checkpoint-4"),
                checkpoint_state(split / "checkpoints" / "checkpoint-4"))
    trained = checkpoint_state(straight / "checkpoints" / "checkpoint-4")["model.safetensors:conv_in.weight"]
    first = checkpoint_state(straight / "checkpoints" / "checkpoint-2")["model.safetensors:conv_in.weight"]
    assert not torch.equal(trained, first)  # it trains

    pipe = DiffusionPipeline.from_pretrained(str(straight / "final"))
    recipe = json.loads((straight / "final" / "stepdistill.json").read_text())
    assert recipe["objective"] == "one_step_denoise_test" and recipe["student_timesteps"] == [999]
    images = pipe("a photo of a cat", output_type="latent", **recipe["pipeline_kwargs"]).images
    assert torch.isfinite(images).all()

    capsys.readouterr()
    assert main(["plan", "--json", "--model", "tiny-sd", "--gpu-gib", "80", *args(tiny_sd, tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("{"):])
    row = plan["estimates"][0]
    assert plan["recommendation"] == "as configured" and set(row["options"]["trainable_params"]) == {"generator"}
    assert row["options"]["trainable_params"]["generator"] > 0 and row["activations"] > 0
