"""Runs that cannot lose work, through the command line: `train.overwrite` on a folder holding an older, longer run
moves that run aside (kept whole) instead of mixing checkpoints; pruning never deletes the new run's checkpoints in
favour of another run's; `resume=latest` never continues another config's checkpoint."""
from __future__ import annotations

import shutil

from reliability_utils import checkpoint_steps, tiny_tree, write_config

from stepdistill.cli import main


def test_overwrite_moves_the_old_run_aside_and_never_resumes_or_prunes_across_runs(tmp_path, capsys):
    out = tmp_path / "run"
    old = write_config(tiny_tree(out, max_steps=12, checkpoint_every=4, checkpoints_limit=2), tmp_path / "old.yaml")
    assert main(["train", "--config", str(old)]) == 0
    assert checkpoint_steps(out) == [8, 12]
    new_tree = tiny_tree(out, max_steps=6, checkpoint_every=2, checkpoints_limit=2)
    new_tree["objective"]["lr"] = 5e-3
    new = write_config(new_tree, tmp_path / "new.yaml")
    capsys.readouterr()

    assert main(["train", "--config", str(new)]) == 2  # neither resume nor overwrite: refused, nothing touched
    assert "already holds a run: set train.resume=latest" in capsys.readouterr().err
    assert checkpoint_steps(out) == [8, 12]

    assert main(["train", "--config", str(new), "train.overwrite=true"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and checkpoint_steps(aside[0]) == [8, 12]  # the old run, whole
    assert (aside[0] / "final").is_dir() and (aside[0] / "config.json").is_file()
    assert checkpoint_steps(out) == [4, 6]  # the new run's two newest: none pruned for the old 8 and 12
    assert (out / "pairs").is_dir()  # the keyed pair cache came back for reuse
    assert f"moved the previous contents of {out} to {aside[0]}" in capsys.readouterr().err

    assert main(["train", "--config", str(new), "train.resume=latest", "train.max_steps=8"]) == 0
    assert "resumed from checkpoint-6 at step 6" in capsys.readouterr().err
    assert checkpoint_steps(out) == [6, 8]

    # the old run's newest checkpoint copied in: resume=latest refuses it, naming the difference
    shutil.copytree(aside[0] / "checkpoints" / "checkpoint-12", out / "checkpoints" / "checkpoint-12")
    assert main(["train", "--config", str(new), "train.resume=latest", "train.max_steps=14"]) == 2
    assert "checkpoint-12 was written with another config (objective.lr: 0.01 there, 0.005 here)" in \
        capsys.readouterr().err
    # continuing the new run beside it: pruning keeps the new run's two newest and never touches the foreign one
    resume = out / "checkpoints" / "checkpoint-8"
    assert main(["train", "--config", str(new), f"train.resume={resume}", "train.max_steps=10"]) == 0
    assert checkpoint_steps(out) == [8, 10, 12]


def test_a_folder_that_is_no_run_and_overwrite_with_resume_are_refused(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"jpeg")
    config = write_config(tiny_tree(tmp_path / "photos"), tmp_path / "run.yaml")
    assert main(["train", "--config", str(config)]) == 2
    assert "photos is not empty and holds no stepdistill run (holiday.jpg)" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "train.overwrite=true", "train.resume=latest"]) == 2
    assert "train.overwrite=true and train.resume=latest ask for opposite things" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["holiday.jpg"]

