"""The score-distillation warm-start presets (`vsd_warm_digits`, `snoopi_warm_digits`, `sid_warm_digits`) are the
recipes measured in docs/SCORE_DISTILLATION.md: the demo's regression stage, then the objective from its export,
with exactly the settings of the sweep cells that produced the table (eval/sweeps/score_warm.yaml)."""
from pathlib import Path

import pytest
import yaml

from stepdistill.config import load_config_tree
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "eval/sweeps/score_warm.yaml").read_text())
# preset -> (its second stage's name, the sweep cell it ships)
PRESETS = {"vsd_warm_digits": ("vsd", "vsd_tg_lr2"), "snoopi_warm_digits": ("snoopi", "pgsb_tg_lr2"),
           "sid_warm_digits": ("sid", "sid_k15_lr1")}


def _cell_config(cell: str, out: Path):
    value = SPEC["cells"][cell]
    base, own = (value.get("base", SPEC["base"]), value.get("set", [])) if isinstance(value, dict) else (
        SPEC["base"], value)
    own = [o.replace("{seed}", "0") for o in own if not o.startswith("student.init=")]
    tree = load_config_tree(base, [*SPEC["set"], *own, f"train.output_dir={out}"])
    return stage_config(plan_stages({**tree, "recipe": [{"name": "only"}]})[0], {})


@pytest.mark.parametrize("preset", list(PRESETS))
def test_warm_preset_is_its_sweep_cell(preset, tmp_path):
    stage_name, cell = PRESETS[preset]
    tree = load_config_tree(preset, [f"train.output_dir={tmp_path}"])
    stages = {s.name: s for s in plan_stages(tree)}
    assert list(stages) == ["regression", stage_name]
    regression, score = (stage_config(stages[name], stages) for name in ("regression", stage_name))
    assert regression.objective.name == "regression" and regression.train.max_steps == 600
    assert (regression.objective.pairs.num, regression.objective.pairs.steps,
            regression.objective.pairs.guidance) == (1000, 20, 3.0)
    assert score.student.init == str(tmp_path / "regression" / "final")  # from the regression export
    swept = _cell_config(cell, tmp_path)
    assert score.objective == swept.objective
    assert (score.train.max_steps, score.train.batch_size, score.train.lr_scheduler, score.train.ema_decay) == (
        swept.train.max_steps, swept.train.batch_size, swept.train.lr_scheduler, swept.train.ema_decay)
    assert score.objective.generator_lr == (1e-5 if stage_name == "sid" else 2e-5)
    assert score.objective.critic_lr == 1e-3


def test_vsd_warm_preset_guides_the_teacher_score_only(tmp_path):
    """The measured difference: CFG on the teacher's score with the fake score unguided (ProlificDreamer's VSD);
    SwiftBrush's same scale on both scores drifts to the unguided conditional (docs/SCORE_DISTILLATION.md)."""
    tree = load_config_tree("vsd_warm_digits", [f"train.output_dir={tmp_path}"])
    stages = {s.name: s for s in plan_stages(tree)}
    vsd = stage_config(stages["vsd"], stages)
    assert vsd.objective.name == "vsd" and vsd.objective.fake_guidance == "none"
    assert vsd.objective.real_guidance == 2.0 and vsd.objective.critic_updates == 1
