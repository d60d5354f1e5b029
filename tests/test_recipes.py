"""The recipe runner's planning: stages inherit the previous stage's config with their `set` overrides, reference
only earlier stages, and a stage that switches objective starts that objective's section afresh."""
import pytest

from stepdistill.config import ConfigError, load_config_tree
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config


def base(tmp_path, recipe):
    tree = load_config_tree("regression_gmm", [f"train.output_dir={tmp_path}", "train.max_steps=7"])
    tree["recipe"] = recipe
    return tree


def test_stages_inherit_override_and_reference_earlier_outputs(tmp_path):
    tree = base(tmp_path, [
        {"name": "warm", "set": {"objective.lr": 1e-3}},
        {"name": "dmd2", "set": {"objective.name": "dmd2", "objective.critic_updates": 2,
                                 "student.init": "${stages.warm.final}", "train.max_steps": 9}},
        {"name": "gan", "set": {"objective.real_data": "mixture"}},
    ])
    stages = plan_stages(tree)
    by_name = {s.name: s for s in stages}
    warm, dmd2, gan = (stage_config(s, by_name) for s in stages)
    assert warm.objective.name == "regression" and warm.objective.lr == 1e-3 and warm.train.max_steps == 7
    assert warm.objective.pairs.num == 10000  # the preset's section, inherited
    assert dmd2.objective.name == "dmd2" and dmd2.objective.critic_updates == 2  # a fresh dmd2 section
    assert dmd2.student.init == str(tmp_path / "warm" / "final") and dmd2.train.max_steps == 9
    assert gan.objective.real_data == "mixture" and gan.objective.critic_updates == 2  # inherits the previous stage
    assert [c.train.output_dir for c in (warm, dmd2, gan)] == [str(tmp_path / n) for n in ("warm", "dmd2", "gan")]


@pytest.mark.parametrize("recipe, message", [
    ([{"name": "a", "set": {"student.init": "${stages.b.final}"}}, {"name": "b"}],
     r"recipe\[0\] references stages.b, which is not an earlier stage"),
    ([{"name": "a"}, {"name": "a"}], r"recipe\[1\].name 'a' must be unique"),
    ([{"name": "a", "sets": {}}], r"recipe\[0\]: unknown keys \['sets'\]"),
    ([{"set": {}}], r"recipe\[0\] must be a mapping with a name"),
    ([{"name": "a", "set": {"objective.lrr": 1.0}}], r"recipe\[0\]: unknown config key objective.lrr"),
])
def test_bad_recipes_are_refused_naming_the_stage(tmp_path, recipe, message):
    with pytest.raises(ConfigError, match=message):
        plan_stages(base(tmp_path, recipe))
