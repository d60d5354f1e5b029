"""An exported MLP student of ours as a teacher: on the analytic bench the k-rectified flow of one reflow round is the
next round's teacher (`teacher.kind: mlp`, `teacher.path: ${stages.NAME.final}`). Students of diffusers teachers
need nothing of the kind: their export is a pipeline folder, which loads as a teacher like any other.

The true data distribution (what the metrics compare with) is the GMM the teacher section describes, as for
`teacher.kind: gmm`; the schedule is the export's own."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from stepdistill.schedules import NoiseSchedule
from stepdistill.teachers.gmm import GaussianMixture, GMMTeacher

STUDENT_JSON = "student.json"  # written by export/mlp.py
WEIGHTS = "generator.safetensors"


def read_multistep_export(folder: str | Path) -> dict:
    """The recorded recipe of an MLP export that can serve as a teacher (a multistep flow), or a clear error."""
    folder = Path(folder)
    if not (folder / STUDENT_JSON).is_file():
        raise FileNotFoundError(f"teacher.path {folder} holds no {STUDENT_JSON}: teacher.kind=mlp takes a folder "
                                "that stepdistill exported for an analytic (GMM) teacher, e.g. ${stages.NAME.final}")
    recipe = json.loads((folder / STUDENT_JSON).read_text())
    if not recipe.get("any_num_steps") or recipe.get("schedule") != "flow":
        raise ValueError(f"teacher.path {folder} is a {len(recipe['timesteps'])}-step {recipe.get('schedule')} "
                         "student, which has no ODE to sample: teacher.kind=mlp takes a multistep flow export "
                         "(objective reflow)")
    return recipe


class TrainedMLPTeacher(GMMTeacher):
    """A k-rectified flow exported as MLP weights, sampled with its own ODE (Euler on its flow schedule); its
    backbone initializes the next round's student (reflow round k+1 starts from round k, Liu et al. 2023 §3.2)."""

    def __init__(self, folder: str | Path, mixture: GaussianMixture, device: torch.device | str = "cpu") -> None:
        from stepdistill.export import load_mlp_student

        recipe = read_multistep_export(folder)
        super().__init__(mixture, NoiseSchedule.flow(recipe["flow_shift"], recipe["num_train_timesteps"]),
                         recipe["backbone"]["hidden"], recipe["backbone"]["depth"])
        net: nn.Module = load_mlp_student(folder, self).backbone
        self.backbone = net.to(device).requires_grad_(False).eval()
        self.device = torch.device(device)
        digest = hashlib.sha256((Path(folder) / WEIGHTS).read_bytes()).hexdigest()[:16]
        self.identity = f"mlp:{Path(folder).resolve()}:{digest}"

    def model_output(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        return self.call(self.backbone, x_t, torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]), fields)

    def build_backbone(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return copy.deepcopy(self.backbone).to(dtype).requires_grad_(True).train()
