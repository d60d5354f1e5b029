"""DMD2's one-step warm start as one command (`dmd2_sdxl_1step_warm`): a regression stage on teacher pairs, then
DMD2 whose generator starts from that stage's export, both conditioned at t = 399; command-line overrides reach
every stage. Run through the CLI on a tiny SDXL teacher."""
import json

import torch
import yaml
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.config import load_config_tree, read_config_tree
from stepdistill.objectives import build_objective
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config
from stepdistill.teachers.tiny import save_tiny_pipeline


def test_regression_then_dmd2_from_its_export(tmp_path, capsys):
    teacher = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    out = tmp_path / "run"
    overrides = [f"teacher.path={teacher}", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
                 "train.checkpoint_every=0", "train.report_to=none", "train.num_validation_samples=2",
                 "train.progress=false", "train.mixed_precision='no'", "train.gradient_checkpointing=false",
                 "objective.pairs.num=4", "objective.pairs.steps=2"]
    tree = load_config_tree("dmd2_sdxl_1step_warm", overrides)
    stages = {s.name: s for s in plan_stages(tree)}
    assert list(stages) == ["regression", "dmd2"]
    dmd2 = stage_config(stages["dmd2"], stages)
    assert dmd2.objective.name == "dmd2" and dmd2.student.init == str(out / "regression" / "final")
    assert dmd2.teacher.path == str(teacher) and dmd2.train.max_steps == 120000  # the stage's own budget
    short = read_config_tree("dmd2_sdxl_1step_warm")  # the preset with a two-step DMD2 stage
    short["recipe"][1]["set"]["train.max_steps"] = 2
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(short))
    assert main(["train", "--json", "--config", str(tmp_path / "warm.yaml"), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in summary["stages"]] == ["regression", "dmd2"]
    for stage in ("regression", "dmd2"):
        recipe = json.loads((out / stage / "final" / "stepdistill.json").read_text())
        assert recipe["student_timesteps"] == [399.0]
    # the DMD2 generator starts from the regression export, not from the teacher
    generator = build_objective(dmd2, "cpu").generator.backbone.state_dict()
    exported = load_file(str(out / "regression" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    teacher_unet = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(generator[k], v) for k, v in exported.items())
    assert any(not torch.equal(exported[k], teacher_unet[k]) for k in exported)


def test_digits_warm_preset_is_the_demos_measured_recipe(tmp_path):
    """`dmd2_warm_digits` (the demo) is the warm start measured in docs/DMD2.md: regression on 1000 20-step teacher
    pairs, then DMD2 from its export (generator lr 5e-5, real guidance 2); one
    train.max_steps sets both stages' length."""
    tree = load_config_tree("dmd2_warm_digits", [f"train.output_dir={tmp_path}"])
    stages = {s.name: s for s in plan_stages(tree)}
    regression, dmd2 = (stage_config(stages[name], stages) for name in ("regression", "dmd2"))
    assert regression.objective.name == "regression" and regression.train.max_steps == 600
    assert (regression.objective.pairs.num, regression.objective.pairs.steps) == (1000, 20)
    assert regression.objective.pairs.guidance == 3.0
    assert dmd2.objective.name == "dmd2" and dmd2.student.init == str(tmp_path / "regression" / "final")
    assert (dmd2.objective.generator_lr, dmd2.objective.critic_lr, dmd2.objective.real_guidance) == (5e-5, 1e-3, 2.0)
    assert dmd2.train.max_steps == 600 and dmd2.objective.critic_updates == 2 and dmd2.train.ema_decay == 0.99
    from stepdistill.miniature.demo import DEMO_CONFIG

    assert DEMO_CONFIG == "dmd2_warm_digits"
    short = load_config_tree("dmd2_warm_digits", [f"train.output_dir={tmp_path}", "train.max_steps=3"])
    assert all(stage_config(s, stages).train.max_steps == 3 for s in plan_stages(short))

def test_digits_warm_gan_preset_is_the_measured_gan_stage(tmp_path):
    """`dmd2_warm_gan_digits` (docs/DMD2.md, the GAN stage): a regression stage on 4000 teacher pairs, then DMD2 with
    DMD v1's regression term on the same cached pairs and the GAN on real digits, from the regression export."""
    tree = load_config_tree("dmd2_warm_gan_digits", [f"train.output_dir={tmp_path}"])
    stages = {s.name: s for s in plan_stages(tree)}
    regression, gan = (stage_config(stages[name], stages) for name in ("regression", "dmd2_gan"))
    assert (regression.objective.pairs.num, regression.objective.pairs.steps, regression.train.max_steps) == (4000, 20,
                                                                                                            2400)
    assert gan.objective.name == "dmd2" and gan.student.init == str(tmp_path / "regression" / "final")
    assert gan.objective.pairs.dir == str(tmp_path / "regression" / "pairs")  # the regression stage's cache, reused
    assert (gan.objective.pairs.num, gan.objective.pairs.steps) == (4000, 20)
    assert gan.objective.real_data == "images" and gan.data.image_dir == "runs/real_digits"
    assert (gan.objective.regression_weight, gan.objective.gan_generator_weight, gan.objective.gan_critic_weight) == (
        1.0, 2e-2, 1e-1)
    assert (gan.objective.generator_lr, gan.objective.real_guidance, gan.train.max_steps) == (5e-5, 2.1, 600)
    assert gan.train.lr_scheduler == "linear" and regression.train.lr_scheduler == "constant_with_warmup"
