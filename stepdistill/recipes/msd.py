"""The route stage of multi-student distillation (MSD, arXiv 2410.23274): after a fan-out trained one student per
part of a partition (`for_each: {data.partition.part: [0, ..., K-1]}`), the students, one per part, become one
routed export (export/routed.py) that `pipelines.load_exported` returns as a RoutedPipeline.

    recipe:
      - {name: student, for_each: {data.partition.part: [0, 1, 2, 3]}}
      - {name: routed, route: student}
"""
from __future__ import annotations

import hashlib
import json

from stepdistill.config import Config, ConfigError
from stepdistill.data.partition import load_partition, partition_dir
from stepdistill.export.routed import export_routed
from stepdistill.io import write_atomic


def run_route_stage(stage, members: list[tuple[Config, object]], stage_file: str, overwrite: bool = False) -> dict:
    """Write the routed export of the finished `members` (config and Stage of each fanned-out student) into
    stage.final; skipped when it was written from the same students. `stage_file` is the runner's record of a
    finished stage, in each stage's output folder."""
    from accelerate import PartialState

    records = [json.loads((member.output_dir / stage_file).read_text()) for _, member in members]
    digest = hashlib.sha256(json.dumps([r["config_hash"] for r in records]).encode()).hexdigest()[:16]
    record = stage.output_dir / stage_file
    if record.is_file() and not overwrite and stage.final.is_dir():
        done = json.loads(record.read_text())
        if done.get("config_hash") == digest:
            return {"stage": stage.name, "skipped": True, **done}
    by_part = {}
    partition = None
    for cfg, member in members:
        settings = cfg.data.partition
        if settings.parts == 1:
            raise ConfigError(f"recipe stage {stage.name} routes between {member.name} and its siblings, but they "
                              "trained on every condition: fan out over data.partition.part with data.partition.parts "
                              "> 1")
        fitted = load_partition(partition_dir(settings, member.output_dir))
        if partition is not None and not partition.same_as(fitted):
            raise ConfigError(f"recipe stage {stage.name}: {member.name} was trained with another partition than its "
                              "siblings; give them the same data.partition.parts, rule, seed and prompts")
        if settings.part in by_part:
            raise ConfigError(f"recipe stage {stage.name}: {member.name} and {by_part[settings.part].name} both "
                              f"trained part {settings.part}")
        partition, by_part[settings.part] = fitted, member
    if sorted(by_part) != list(range(partition.num_parts)):
        raise ConfigError(f"recipe stage {stage.name}: the students cover parts {sorted(by_part)} of "
                          f"{partition.num_parts}; fan out over every part, data.partition.part: "
                          f"{list(range(partition.num_parts))}")
    summary = {"output_dir": str(stage.output_dir), "export": str(stage.final),
               "students": [str(by_part[k].final) for k in range(partition.num_parts)]}
    if PartialState().is_main_process:
        export_routed([by_part[k].final for k in range(partition.num_parts)], partition, stage.final)
        write_atomic(record, json.dumps({"config_hash": digest, **summary}, indent=2))
    PartialState().wait_for_everyone()
    return {"stage": stage.name, **summary}
