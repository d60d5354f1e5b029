"""Resolving a recipe into stage configs, and running them in order."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from stepdistill.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    parse_set,
    read_config_tree,
)
from stepdistill.io import write_atomic

REFERENCE = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.(final|output_dir)\}")
STAGE_KEYS = {"name", "config", "set", "for_each", "route"}
STAGE_FILE = "stage.json"


@dataclass
class Stage:
    name: str
    tree: dict  # the stage's config tree, references unresolved
    output_dir: Path
    routes: list[str] = field(default_factory=list)  # a route stage: the fanned-out stages it routes between
    group: str = ""  # a fanned-out stage: the name of its fan-out

    @property
    def final(self) -> Path:
        return self.output_dir / "final"


def _references(value) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for v in value for r in _references(v)]
    return []


def _substitute(value, stages: dict[str, Stage]):
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: str(getattr(stages[m.group(1)], m.group(2))), value)
    if isinstance(value, dict):
        return {k: _substitute(v, stages) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, stages) for v in value]
    return value


def plan_stages(tree: dict) -> list[Stage]:
    """The stages of a config tree with a `recipe` list, each validated (references left as they are).

    A stage with `for_each: {dotted.key: [v0, v1, ...], ...}` fans out into stages NAME-0, NAME-1, ... (the lists
    zipped, one value of each per stage), which do not depend on each other; the stage after them continues from
    their shared config. A stage `{name: ..., route: NAME}` trains nothing: it writes the routed export of the
    fanned-out stages NAME-i, one per part of their partition (multi-student distillation, recipes/msd.py)."""
    recipe = tree.get("recipe")
    if not isinstance(recipe, list) or not recipe:
        raise ConfigError("recipe must be a non-empty list of stages, e.g. [{name: seg8, set: {...}}, ...]")
    base = {k: v for k, v in tree.items() if k != "recipe"}
    root = Path((base.get("train") or {}).get("output_dir", "runs/default"))
    stages: list[Stage] = []
    fan_outs: dict[str, list[str]] = {}
    previous = base
    for i, spec in enumerate(recipe):
        where = f"recipe[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where} must be a mapping with a name, e.g. {{name: stage1, set: {{...}}}}")
        unknown = sorted(set(spec) - STAGE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; a stage takes {sorted(STAGE_KEYS)}")
        name = spec["name"]
        if "route" in spec:
            stages.append(_route_stage(spec, where, previous, root, fan_outs, stages))
            continue
        stage_tree = copy.deepcopy(read_config_tree(spec["config"]) if "config" in spec else previous)
        stage_tree.pop("recipe", None)
        for key, value in parse_set(spec.get("set") or {}, f"{where}.set"):
            _set_stage_key(stage_tree, key, value)
        previous = stage_tree
        variants = _fan_out(spec["for_each"], f"{where}.for_each") if "for_each" in spec else [[]]
        names = [f"{name}-{j}" for j in range(len(variants))] if "for_each" in spec else [name]
        for stage_name, overrides in zip(names, variants):
            _check_name(stage_name, where, stages)
            stage_tree = copy.deepcopy(previous)
            for key, value in overrides:
                _set_stage_key(stage_tree, key, value)
            known = {s.name for s in stages}
            for ref, _ in _references(stage_tree):
                if ref not in known:
                    raise ConfigError(f"{where} references stages.{ref}, which is not an earlier stage of this "
                                      f"recipe (earlier: {sorted(known) or 'none'})")
            out = root / stage_name
            stage_tree.setdefault("train", {})["output_dir"] = str(out)
            config_from_dict(stage_tree, where + ": ")
            stages.append(Stage(stage_name, stage_tree, out, group=name if "for_each" in spec else ""))
        if "for_each" in spec:
            fan_outs[name] = names
    return stages


def _check_name(name: str, where: str, stages: list[Stage]) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or any(s.name == name for s in stages):
        raise ConfigError(f"{where}.name {name!r} must be unique and made of letters, digits, '_' and '-'")


def _fan_out(for_each, where: str) -> list[list[tuple[str, object]]]:
    """The overrides of each fanned-out stage: the value lists zipped."""
    if not isinstance(for_each, dict) or not for_each or \
            not all(isinstance(v, list) and v for v in for_each.values()):
        raise ConfigError(f"{where} must map dotted keys to non-empty lists of values, e.g. "
                          "{data.partition.part: [0, 1, 2, 3]}")
    lengths = {len(v) for v in for_each.values()}
    if len(lengths) > 1:
        raise ConfigError(f"{where}: the value lists have different lengths {sorted(lengths)}; give one value per "
                          "stage for every key")
    return [[(key, values[j]) for key, values in for_each.items()] for j in range(lengths.pop())]


def _route_stage(spec: dict, where: str, previous: dict, root: Path, fan_outs: dict[str, list[str]],
                 stages: list[Stage]) -> Stage:
    if set(spec) != {"name", "route"}:
        raise ConfigError(f"{where}: a route stage takes only name and route, e.g. {{name: routed, route: student}}")
    _check_name(spec["name"], where, stages)
    if spec["route"] not in fan_outs:
        raise ConfigError(f"{where}.route: {spec['route']!r} is not an earlier stage with for_each (fanned out: "
                          f"{sorted(fan_outs) or 'none'})")
    tree = copy.deepcopy(previous)
    tree.setdefault("train", {})["output_dir"] = str(root / spec["name"])
    return Stage(spec["name"], tree, root / spec["name"], routes=list(fan_outs[spec["route"]]))


def _set_stage_key(tree: dict, dotted: str, value) -> None:
    """Apply one override; a new objective.name starts that objective's section afresh (other keys would not fit)."""
    parts = dotted.split(".")
    if parts == ["objective", "name"] and (tree.get("objective") or {}).get("name") != value:
        tree["objective"] = {}
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def stage_config(stage: Stage, stages: dict[str, Stage]) -> Config:
    return config_from_dict(_substitute(stage.tree, stages), f"recipe stage {stage.name}: ")


def config_hash(cfg: Config) -> str:
    tree = config_to_dict(cfg)
    tree["train"] = {k: v for k, v in tree["train"].items() if k not in ("resume", "overwrite", "progress")}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished(stage: Stage) -> bool:
    return (stage.output_dir / STAGE_FILE).is_file() and stage.final.is_dir()


def run_recipe(tree: dict, overwrite: bool = False, only: list[str] | None = None) -> list[dict]:
    """Run the stages in order: finished ones (same config) are skipped, an interrupted one resumes. `only` runs
    just the named stages (a fan-out's name stands for all its stages), once the stages they need have finished:
    separate launches, e.g. one per GPU group, can then train the stages of a fan-out side by side."""
    from accelerate import PartialState

    from stepdistill.objectives import objective_class
    from stepdistill.training import Trainer

    stages = plan_stages(tree)
    by_name = {s.name: s for s in stages}
    selected = _selected(stages, only)
    for stage in stages:  # every stage's refusals before the first one trains (e.g. a last stage's LPIPS weights)
        if stage.name in selected and not stage.routes:
            cfg = stage_config(stage, by_name)
            objective_class(cfg.objective.name).preflight(cfg)
    results = []
    for stage in stages:
        if stage.name not in selected:
            continue
        needed = stage.routes + [ref for ref, _ in _references(stage.tree)]
        missing = [n for n in dict.fromkeys(needed) if n not in selected and not finished(by_name[n])]
        if missing:
            raise ConfigError(f"recipe stage {stage.name} needs stages {missing}, which have not finished: run them "
                              "first (stepdistill train --config ... --stage NAME)")
        if stage.routes:
            from stepdistill.recipes.msd import run_route_stage

            results.append(run_route_stage(stage, [(stage_config(by_name[n], by_name), by_name[n])
                                                   for n in stage.routes], STAGE_FILE, overwrite))
            continue
        cfg = stage_config(stage, by_name)
        digest = config_hash(cfg)
        record = stage.output_dir / STAGE_FILE
        if record.is_file() and not overwrite:
            done = json.loads(record.read_text())
            if done.get("config_hash") == digest and stage.final.is_dir():
                results.append({"stage": stage.name, "skipped": True, **done})
                continue
            raise ConfigError(f"recipe stage {stage.name} in {stage.output_dir} finished with another config: set "
                              "train.overwrite=true to train it again, or choose another train.output_dir")
        if (stage.output_dir / "config.json").is_file() and not overwrite and not cfg.train.resume:
            cfg.train.resume = "latest"  # an interrupted stage continues; the trainer checks the config matches
        cfg.train.overwrite = cfg.train.overwrite or overwrite
        result = Trainer(cfg).train()
        summary = {"output_dir": str(result.output_dir), "steps": result.step,
                   "export": str(result.final_dir) if result.final_dir else None}
        if result.interrupted:
            summary["interrupted"] = result.interrupted
            results.append({"stage": stage.name, **summary})
            return results
        if PartialState().is_main_process:
            write_atomic(record, json.dumps({"config_hash": digest, **summary}, indent=2))
        results.append({"stage": stage.name, **summary})
    return results


def train_recipe(tree: dict, only: list[str] | None = None) -> list[dict]:
    """`run_recipe` as a command runs it: overwrite from the tree's train section, the process group closed at the
    end, and a stage a signal stopped raised as `Stopped` with where to continue."""
    from stepdistill.errors import Stopped
    from stepdistill.training.accel import close_process_group

    try:
        stages = run_recipe(tree, overwrite=bool((tree.get("train") or {}).get("overwrite", False)), only=only)
    finally:
        close_process_group()
    stopped = [s for s in stages if s.get("interrupted")]
    if stopped:
        last = stopped[-1]
        raise Stopped(last["interrupted"], f"recipe stage {last['stage']} stopped at step {last['steps']} after saving "
                      f"checkpoint-{last['steps']} in {Path(last['output_dir']) / 'checkpoints'}; run the same "
                      "command to continue")
    return stages


def _selected(stages: list[Stage], only: list[str] | None) -> set[str]:
    names = {s.name for s in stages}
    if not only:
        return names
    groups = {s.group for s in stages if s.group}
    unknown = [n for n in only if n not in names and n not in groups]
    if unknown:
        raise ConfigError(f"--stage {unknown}: not stages of this recipe (stages: {sorted(names)})")
    return {s.name for s in stages if s.name in only or s.group in only}
