"""The lean optimization loop of the analytic benches: its per-step hook sees every step once, after the update."""
import torch

from stepdistill.training.lean import build, optimize


def test_after_step_sees_each_step_after_its_update():
    objective = build("configs/dmd2_gmm.yaml", ["teacher.backbone_hidden=32"])
    before = [p.detach().clone() for p in objective.generator.parameters()]
    seen = []

    def record(done: int) -> None:
        changed = any(not torch.equal(a, b) for a, b in zip(before, objective.generator.parameters()))
        seen.append((done, changed))

    optimize(objective, 4, 16, after_step=record)
    assert [d for d, _ in seen] == [1, 2, 3, 4]
    assert seen[0][1], "the hook ran before the first generator update"
