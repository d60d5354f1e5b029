"""MSD's claim on the analytic teacher (MSD Table: 4 students at batch 32 beat 1 at batch 128): the 8-class
overlapping ring at guidance 3 (preset msd_gmm), 4 one-step DMD2 students (one per contiguous pair of classes, each
with its own critic, batch 32) against one student at batch 128, both for 500 generator updates (1000 steps), judged
by SW2 and mode TV against 4096 of the teacher's 200-step CFG samples (eval/msd_gmm.py). A router that sends every
class to the next student (defect) must fail the same bound.

Measured (students are MLPs of hidden size 32, as in the preset; seeds 0 / 1 / 2; (SW2, mode TV)):
    4 students x batch 32   (0.1731, 0.1819)  (0.1737, 0.2080)  (0.1809, 0.2029)   mean (0.1759, 0.1976)
    1 student  x batch 128  (0.2140, 0.2349)  (0.2063, 0.2717)  (0.2567, 0.2688)   mean (0.2257, 0.2585)
    4 students, wrong route (0.2489, 0.5520)  (0.4056, 0.6040)  (0.4381, 0.6484)   mean (0.3642, 0.6015)
With hidden 128 (seed 0, eval/msd_gmm.py) MSD does not win: (0.1682, 0.2109) for 4 students vs (0.1586, 0.1914) for
one; MSD's gain here is the capacity each student spends on fewer classes. This test: 164 s of single-thread CPU (user + sys).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.pipelines.routed import RoutedGenerator

SEEDS, STEPS, BATCH, PARTS = (0, 1, 2), 1000, 32, 4
OVERRIDES = ["teacher.backbone_hidden=32"]  # the preset's, stated so the numbers above stay tied to it


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("msd_gmm", Path(__file__).parents[1] / "eval" / "msd_gmm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def beats(report, single) -> bool:
    return report.sw2 < single.sw2 and report.mode_tv < single.mode_tv


def test_four_students_beat_one_at_four_times_the_batch_and_a_wrong_router_does_not(script):
    torch.set_num_threads(1)
    labels, x_ref = script.reference(OVERRIDES)
    rows = []
    for seed in SEEDS:
        routed, classes = script.train_students(PARTS, BATCH, STEPS, seed, OVERRIDES)
        single = script.train_single(PARTS * BATCH, STEPS, seed, OVERRIDES)
        wrong = RoutedGenerator(list(routed.generators), script.NextStudent(PARTS, routed.partition.tensors))
        reports = [evaluate_generator(g, seed=1, labels=labels, reference=x_ref) for g in (routed, single, wrong)]
        rows.append([(round(r.sw2, 4), round(r.mode_tv, 4)) for r in reports])
        # every class goes to exactly one student, the one that trained on it
        teacher = routed.teacher
        parts = routed.partition.route(teacher.encode(torch.arange(teacher.num_classes)))
        assert [sorted(torch.nonzero(parts == k).flatten().tolist()) for k in range(PARTS)] == classes
        assert classes == [[0, 1], [2, 3], [4, 5], [6, 7]]
        msd, one, wrong_route = reports
        assert beats(msd, one) and not beats(wrong_route, one), rows
