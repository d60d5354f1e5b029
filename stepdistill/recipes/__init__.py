"""Multi-stage runs: a config whose `recipe:` lists stages (progressive segment schedules, reflow rounds, a
warm start then DMD2, one student per partition). Each stage is a full config: the previous stage's (or the
top level's, for the first) with the stage's `set` overrides, or a whole other config (`config:`); strings may
reference earlier stages' outputs, `${stages.NAME.final}` (the export) and `${stages.NAME.output_dir}`. Stage
NAME trains in <train.output_dir>/NAME; a finished stage is skipped when the recipe runs again, an interrupted one
resumes from its latest checkpoint.

    recipe:
      - {name: seg8, set: {objective.num_segments: 8, train.max_steps: 5000}}
      - {name: seg4, set: {objective.num_segments: 4, student.init: "${stages.seg8.final}"}}

A stage with `for_each: {key: [values]}` fans out into independent stages NAME-0, NAME-1, ...; `{name: ..., route:
NAME}` writes the routed export of a fan-out over the parts of a partition (multi-student distillation, msd.py).
`stepdistill train --stage NAME` runs only the named stages (separate launches, e.g. one per GPU group).
"""
from stepdistill.recipes.runner import Stage, plan_stages, run_recipe, train_recipe

__all__ = ["Stage", "plan_stages", "run_recipe", "train_recipe"]
