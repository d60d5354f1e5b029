"""Resolving a recipe into stage configs, and running them in order."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
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
STAGE_KEYS = {"name", "config", "set"}
STAGE_FILE = "stage.json"


@dataclass
class Stage:
    name: str
    tree: dict  # the stage's config tree, references unresolved
    output_dir: Path

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
    """The stages of a config tree with a `recipe` list, each validated (references left as they are)."""
    recipe = tree.get("recipe")
    if not isinstance(recipe, list) or not recipe:
        raise ConfigError("recipe must be a non-empty list of stages, e.g. [{name: seg8, set: {...}}, ...]")
    base = {k: v for k, v in tree.items() if k != "recipe"}
    root = Path((base.get("train") or {}).get("output_dir", "runs/default"))
    stages: list[Stage] = []
    previous = base
    for i, spec in enumerate(recipe):
        where = f"recipe[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where} must be a mapping with a name, e.g. {{name: stage1, set: {{...}}}}")
        unknown = sorted(set(spec) - STAGE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; a stage takes {sorted(STAGE_KEYS)}")
        name = spec["name"]
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or any(s.name == name for s in stages):
            raise ConfigError(f"{where}.name {name!r} must be unique and made of letters, digits, '_' and '-'")
        stage_tree = copy.deepcopy(read_config_tree(spec["config"]) if "config" in spec else previous)
        stage_tree.pop("recipe", None)
        for key, value in parse_set(spec.get("set") or {}, f"{where}.set"):
            _set_stage_key(stage_tree, key, value)
        known = {s.name for s in stages}
        for ref, _ in _references(stage_tree):
            if ref not in known:
                raise ConfigError(f"{where} references stages.{ref}, which is not an earlier stage of this recipe "
                                  f"(earlier: {sorted(known) or 'none'})")
        previous = stage_tree
        out = root / name
        stage_tree = copy.deepcopy(stage_tree)
        stage_tree.setdefault("train", {})["output_dir"] = str(out)
        config_from_dict(stage_tree, where + ": ")
        stages.append(Stage(name, stage_tree, out))
    return stages


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


def run_recipe(tree: dict, overwrite: bool = False) -> list[dict]:
    """Run the stages in order: finished ones (same config) are skipped, an interrupted one resumes."""
    from accelerate import PartialState

    from stepdistill.objectives import objective_class
    from stepdistill.training import Trainer

    stages = plan_stages(tree)
    by_name = {s.name: s for s in stages}
    for stage in stages:  # every stage's refusals before the first one trains (e.g. a last stage's LPIPS weights)
        cfg = stage_config(stage, by_name)
        objective_class(cfg.objective.name).preflight(cfg)
    results = []
    for stage in stages:
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
