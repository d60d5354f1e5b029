"""The regression objective end to end on the analytic teacher, through the real CLI config and trainer."""
import json

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.data import PairDataset
from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.objectives import build_objective
from stepdistill.objectives.regression import Regression
from stepdistill.training import Trainer


class ShuffledPairs(Regression):
    """Test-only defect: the cached targets no longer belong to their noise."""

    def dataset(self):
        data = super().dataset()
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        data.tensors["x0"] = data.tensors["x0"][perm]
        return data


def run(tmp_path, overrides, shuffle_pairs=False):
    cfg = load_config("configs/regression_gmm.yaml", [f"train.output_dir={tmp_path}", "train.progress=false",
                                                      "train.checkpoint_every=0", *overrides])
    objective = None
    if shuffle_pairs:
        built = build_objective(cfg)
        objective = ShuffledPairs(built.teacher, built.generator, built.source, cfg.objective, cfg.data)
    trainer = Trainer(cfg, objective)
    trainer.train()
    return evaluate_generator(trainer.generator_for_inference(), seed=1)


@pytest.mark.slow
def test_regression_gmm_reaches_the_mixture_and_shuffled_pairs_fail(tmp_path):
    good = run(tmp_path / "good", [])
    # measured (seed 0): SW2 0.045, ED 0.0016, precision 0.95
    assert good.sw2 <= 0.05 and good.energy <= 0.002 and good.precision >= 0.85, good
    bad = run(tmp_path / "bad", ["train.max_steps=500"], shuffle_pairs=True)
    # shuffled pairs regress onto the mean of all endpoints: measured SW2 ~0.7
    assert bad.sw2 > 0.3 and bad.precision < 0.5, bad


def test_pairs_are_cached_once_and_reused(tmp_path):
    cfg = load_config("configs/regression_gmm.yaml", [f"train.output_dir={tmp_path}", "objective.pairs.num=300",
                                                      "objective.pairs.steps=5"])
    obj = build_objective(cfg, "cpu")
    assert isinstance(obj, Regression)
    obj.prepare_data(str(tmp_path), "cpu")
    pairs = PairDataset(tmp_path / "pairs")
    assert len(pairs) == 300 and set(pairs[0]) == {"noise", "x0", "cond_index"}
    stamp = (tmp_path / "pairs" / "pairs-00000.safetensors").stat().st_mtime_ns
    obj.prepare_data(str(tmp_path), "cpu")
    assert (tmp_path / "pairs" / "pairs-00000.safetensors").stat().st_mtime_ns == stamp
    # the cached endpoint is the teacher's ODE endpoint of the cached noise
    teacher = obj.teacher
    x0 = teacher.sample(pairs.tensors["noise"][:8], teacher.encode(pairs.tensors["cond_index"][:8]), 5)
    torch.testing.assert_close(x0, pairs.tensors["x0"][:8])


def test_cli_train_writes_metrics_checkpoint_and_export(tmp_path):
    from stepdistill.cli import main
    from stepdistill.export import load_mlp_student
    from stepdistill.teachers.gmm import GMMTeacher

    out = tmp_path / "run"
    code = main(["train", "--config", "configs/regression_gmm.yaml", f"train.output_dir={out}",
                 "train.max_steps=20", "train.checkpoint_every=10", "objective.pairs.num=512",
                 "objective.pairs.steps=10", "train.progress=false"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and set(metrics["metrics"]) >= {"sw2", "energy", "precision"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    assert (out / "samples" / "step-0000020.png").is_file()
    student = load_mlp_student(out / "final", GMMTeacher())
    assert student.timesteps == [999.0] and student.prediction_type == "sample"
    assert main(["train", "--config", "configs/regression_gmm.yaml", "train.bogus=1"]) == 2
