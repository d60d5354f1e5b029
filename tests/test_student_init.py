"""student.init: a student starts from saved weights (a stage-1 export, a model folder or a weights file) instead
of the teacher's, and weights of another architecture are refused."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stepdistill.config import load_config
from stepdistill.training import build_objective

ROOT = Path(__file__).resolve().parents[1]


def generator_state(overrides=()):
    cfg = load_config(str(ROOT / "configs/dmd2_gmm.yaml"), ["teacher.backbone_hidden=32", *overrides])
    return build_objective(cfg, "cpu").generator.backbone.state_dict()


def test_student_starts_from_saved_weights_file_or_export_folder(tmp_path):
    start = {k: v + torch.randn_like(v) for k, v in generator_state().items()}  # not the teacher's weights
    save_file(start, str(tmp_path / "weights.safetensors"))
    export = tmp_path / "final"
    export.mkdir()
    save_file(start, str(export / "generator.safetensors"))  # the MLP export's layout
    for init in (tmp_path / "weights.safetensors", export):
        loaded = generator_state([f"student.init={init}"])
        assert all(torch.equal(loaded[k], start[k]) for k in start)
    assert not all(torch.equal(generator_state()[k], start[k]) for k in start)


def test_student_init_refuses_missing_paths_other_architectures_and_lora(tmp_path):
    with pytest.raises(FileNotFoundError, match="student.init"):
        generator_state([f"student.init={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="exported student folder"):
        generator_state([f"student.init={tmp_path}"])
    small = generator_state(["student.kind=smaller", "student.overrides={hidden: 16}"])
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        generator_state([f"student.init={tmp_path / 'small.safetensors'}"])
    with pytest.raises(ValueError, match="student.kind=lora"):
        generator_state(["student.kind=lora", "student.lora_targets=[inp]",
                         f"student.init={tmp_path / 'small.safetensors'}"])
