"""The checks `stepdistill train --config PRESET` makes before any work, for every stage of a shipped preset, run
in-process from the current folder: imported by tests/test_fresh_env.py, and run as a script by the installed
wheel's test (`python preset_preflight.py NAME ...` prints each name whose checks passed)."""
from __future__ import annotations

import json
import logging
import sys

from stepdistill.config import check_before_import, config_from_dict, load_config_tree
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config
from stepdistill.training.preflight import check_inputs

log = logging.getLogger("preset_preflight")


def preflight(name: str) -> list[str]:
    """Run the preset's checks (config values, output folder, teacher source, prompts, real images, the objective's
    own refusals) for each stage; a stage whose teacher or student is an earlier stage's output skips the teacher
    source (that output does not exist before the recipe runs). Returns the checked stages' teacher paths."""
    tree = load_config_tree(name)
    if not tree.get("recipe"):
        check_before_import(tree)
        cfg = config_from_dict(tree)
        check_inputs(cfg, load_teacher=True, warn=log.warning)
        return [cfg.teacher.path]
    stages = plan_stages(tree)
    by_name = {stage.name: stage for stage in stages}
    teachers = []
    for stage in stages:
        if stage.routes:
            continue
        cfg = stage_config(stage, by_name)
        check_inputs(cfg, load_teacher="${stages." not in json.dumps(stage.tree), warn=log.warning)
        teachers.append(cfg.teacher.path)
    return teachers


if __name__ == "__main__":
    for preset in sys.argv[1:]:
        preflight(preset)
        print(preset)
