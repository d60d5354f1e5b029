"""Students of the analytic teacher: the MLP backbone's weights (LoRA merged; the adapter also on its own) and a
JSON with its architecture and SamplingRecipe; reloaded as a generator over the same teacher."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from stepdistill.mlp import TimeCondMLP
from stepdistill.students.base import Generator, generator_class
from stepdistill.students.lora import adapter_layers, adapter_state_dict

STUDENT_JSON = "student.json"
WEIGHTS = "generator.safetensors"
LORA_WEIGHTS = "lora.safetensors"


def _tensors(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def merged_mlp(net: TimeCondMLP) -> TimeCondMLP:
    """A plain TimeCondMLP with the weights `net` computes with (a peft LoRA merged in)."""
    if not adapter_layers(net):
        return net
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(net)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    return merged


def write_mlp_student(generator: Generator, teacher, folder: Path, objective: str = "") -> dict:
    net = generator.backbone
    if not isinstance(net, TimeCondMLP):
        raise TypeError(f"no exporter for a {type(net).__name__} backbone of a {type(teacher).__name__}")
    save_file(_tensors(merged_mlp(net).state_dict()), str(folder / WEIGHTS))
    lora = adapter_state_dict(net)
    if lora:
        save_file(_tensors(lora), str(folder / LORA_WEIGHTS))
    sampling = generator.recipe()
    recipe = {"product": "mlp", "objective": objective, **sampling.as_dict(),
              "num_train_timesteps": sampling.schedule.num_train_timesteps,
              "backbone": {"class": "TimeCondMLP", "data_dim": net.data_dim, "num_classes": net.num_classes,
                           "hidden": net.inp.out_features, "depth": len(net.blocks) + 1, "time_dim": net.time_dim}}
    (folder / STUDENT_JSON).write_text(json.dumps(recipe, indent=2))
    return recipe


def load_mlp_student(folder: str | Path, teacher) -> Generator:
    """Reload a student exported by `write_mlp_student` as a generator over the analytic `teacher`."""
    folder = Path(folder)
    if not (folder / STUDENT_JSON).is_file():
        raise FileNotFoundError(f"{folder} holds no {STUDENT_JSON}: it is not an exported stepdistill MLP student")
    meta = json.loads((folder / STUDENT_JSON).read_text())
    net = TimeCondMLP(**{k: v for k, v in meta["backbone"].items() if k != "class"})
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    return generator_class(meta["generator"]).from_recipe(net, teacher, meta)
