"""LADD (arXiv 2403.12015): discriminator heads on the frozen teacher's features; each phase's gradient reaches
only its own modules (the generator's through the frozen teacher), the hinge losses' signs and scales, the blocks
read, refusals, and 1- and 4-step students that train, resume, export and reload with plain diffusers."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from stepdistill.config import ConfigError, load_config
from stepdistill.objectives import build_objective
from stepdistill.objectives.score_distillation.ladd import backbone_blocks, default_feature_blocks
from stepdistill.pipelines import RECIPE_FILE
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd", "sd3")}


def _overrides(folder, out, kind="sd", timesteps="[999]", steps=2, extra=()):
    return [f"teacher.kind={kind}", f"teacher.path={folder}", f"student.timesteps={timesteps}", "objective.name=ladd",
            "objective.pairs.num=4", "objective.pairs.steps=2", "objective.generator_lr=1e-4",
            "objective.discriminator_lr=1e-3", f"train.output_dir={out}", f"train.max_steps={steps}",
            "train.batch_size=2", "train.checkpoint_every=2", "train.report_to=none", "train.progress=false",
            "train.num_validation_samples=1", "train.mixed_precision='no'", *extra]


@pytest.fixture
def objective(tiny, tmp_path):
    objective = build_objective(load_config(None, _overrides(tiny["sd"], tmp_path / "run")))
    objective.prepare_data(tmp_path / "run", "cpu")
    return objective


def _batch(objective):
    items = [objective.dataset()[i] for i in range(2)]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}


def test_default_blocks_are_three_of_the_upper_half():
    assert default_feature_blocks(30) == [15, 22, 29] and default_feature_blocks(5) == [2, 3, 4]
    assert default_feature_blocks(2) == [1]


def test_the_heads_read_the_teachers_blocks_and_only_train_themselves(objective):
    unet = objective.teacher.backbone
    assert [backbone_blocks(unet)[i] for i in objective.discriminator.blocks] == [unet.mid_block, *unet.up_blocks]
    heads = {id(p) for p in objective.discriminator.parameters()}
    assert heads and not heads & {id(p) for p in unet.parameters()}  # the teacher is not the discriminator's


@pytest.mark.parametrize("phase", ["generator", "discriminator"])
def test_each_phase_reaches_only_its_own_modules(objective, phase):
    """The generator's adversarial gradient flows through the frozen teacher into the sample; the teacher never
    gets one, and the heads only in their own phase."""
    loss = objective.loss(phase, _batch(objective), step=0)["loss"]
    loss.backward()
    generator = [p.grad for p in objective.generator.backbone.parameters()]
    heads = [p.grad for p in objective.discriminator.parameters()]
    assert all(p.grad is None for p in objective.teacher.backbone.parameters())
    if phase == "generator":
        assert any(g is not None and g.abs().sum() > 0 for g in generator) and all(g is None for g in heads)
    else:
        assert all(g is None for g in generator) and any(g is not None and g.abs().sum() > 0 for g in heads)


def test_hinge_losses_signs_and_scales(objective, monkeypatch):
    """With logits +2 on the teacher's samples and -2 on the student's, the discriminator's hinge loss is 0 and
    the generator's is -mean(D(fake)) = 2; swapped, the discriminator's is 2 x 3 = 6."""
    batch = _batch(objective)
    real = batch["x0"]

    def fake_discriminator(x_t, t, fields, sign=1.0):
        is_real = torch.stack([min(((x_t[i] - r).abs().max() for r in real), key=float) < 10 for i in range(len(x_t))])
        return torch.where(is_real, 2.0 * sign, -2.0 * sign) + 0 * x_t.flatten(1).sum(1)

    monkeypatch.setattr(objective, "noised", lambda x: (x, torch.full((x.shape[0],), 500.0)))
    monkeypatch.setattr(objective.generator, "forward", lambda x_in, cond, t: x_in + 100.0)
    monkeypatch.setattr(objective.discriminator, "forward", fake_discriminator)
    assert float(objective.loss("discriminator", batch, 0)["loss"]) == pytest.approx(0.0)
    assert float(objective.loss("generator", batch, 0)["loss"]) == pytest.approx(2.0)
    monkeypatch.setattr(objective.discriminator, "forward", lambda *a: fake_discriminator(*a, sign=-1.0))
    assert float(objective.loss("discriminator", batch, 0)["loss"]) == pytest.approx(6.0)


def test_refusals_name_the_problem(tiny, tmp_path):
    with pytest.raises(ConfigError, match="feature_blocks \\[7\\]: the teacher has 5 blocks"):
        build_objective(load_config(None, _overrides(tiny["sd"], tmp_path, extra=["objective.feature_blocks=[7]"])))
    with pytest.raises(ConfigError, match="teacher network's features"):
        build_objective(load_config(None, ["teacher.kind=gmm", "objective.name=ladd"]))


@pytest.mark.parametrize("kind,timesteps", [("sd", [999]), ("sd3", [1000.0, 750.0, 500.0, 250.0])])
def test_train_resume_export_and_reload_with_plain_diffusers(tiny, tmp_path, kind, timesteps):
    out = tmp_path / "run"
    ts = str(timesteps).replace(" ", "")
    Trainer(load_config(None, _overrides(tiny[kind], out, kind, ts, steps=2))).train()
    trainer = Trainer(load_config(None, _overrides(tiny[kind], out, kind, ts, steps=3,
                                                   extra=["train.resume=latest"])))
    result = trainer.train()
    assert result.step == 3 and {int(s["step"]) for s in trainer.optimizers["discriminator"].state.values()} == {3}
    pipe = DiffusionPipeline.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / RECIPE_FILE).read_text())
    latents = pipe("a photo of a cat", output_type="latent", **recipe["pipeline_kwargs"]).images
    assert recipe["objective"] == "ladd" and pipe.scheduler.timesteps.tolist() == pytest.approx(timesteps)
    assert torch.isfinite(latents).all()
