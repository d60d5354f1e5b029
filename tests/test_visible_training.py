"""A DMD2 run on the shipped digits teacher, watched as a user watches it: one progress line per optimizer phase,
tensorboard events with both learning rates, both phases' losses and a sample grid, labelled and upscaled
previews, a model card with metadata and the teacher's own prompt, world-readable files; then `sample` on the
exported student and `export` of the checkpoint, equal to the run's own export (through main(), in this process)."""
from __future__ import annotations

import json
import os
import re
import stat

import torch
from cli_utils import DIGITS_PROMPTS, DIGITS_TEACHER, DMD2_DIGITS_CONFIG, run_cli
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stepdistill.cli import main


def test_dmd2_digits_run_is_visible_and_its_export_is_usable(tmp_path, capsys):
    mask = os.umask(0o022)
    try:
        proc = run_cli("train", "--config", DMD2_DIGITS_CONFIG, f"teacher.path={DIGITS_TEACHER}",
                       f"data.prompts_file={DIGITS_PROMPTS}", "train.output_dir=run", "train.max_steps=4",
                       "train.batch_size=4", "train.log_every=2", "train.checkpoint_every=2",
                       "train.validate_every=4",
                       "train.num_validation_samples=4", "train.report_to=tensorboard", cwd=tmp_path,
                       TQDM_DISABLE=None)
    finally:
        os.umask(mask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    # one progress line per phase: the critic steps twice per generator step (objective.critic_updates=2)
    assert re.search(r"generator: 100%.*\| 2/2 ", proc.stderr) and re.search(r"critic: 100%.*\| 4/4 ", proc.stderr)

    events = next((run / "logs").rglob("events.out.tfevents.*"))
    log = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    log.Reload()
    scalars = set(log.Tags()["scalars"])
    assert {"lr/generator", "lr/critic", "generator/loss", "generator/dm", "critic/loss", "critic/denoise"} <= scalars
    assert [e.step for e in log.Scalars("critic/loss")] == [2, 4]
    assert log.Tags()["images"] == ["samples"]

    preview = Image.open(run / "samples" / "step-0000004.png")
    assert preview.width >= 2 * 128  # 16-pixel digits upscaled, 2 columns, prompts written under them

    card = ModelCard.load(run / "final" / "README.md")
    assert card.data.objective == "dmd2" and card.data.library_name == "diffusers"
    assert card.data.example_prompt == "a handwritten digit zero" and card.data.training["steps"] == 4
    recipe = json.loads((run / "final" / "stepdistill.json").read_text())
    call = ", ".join(f"{k}={v!r}" for k, v in recipe["pipeline_kwargs"].items())
    assert f"pipe('a handwritten digit zero', {call})" in card.text
    for path in (run / "final").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o004, f"{path} is not world-readable"

    # sample and export in this process (the command line's code, without another interpreter's imports)
    capsys.readouterr()
    assert main(["sample", str(run / "final"), "a handwritten digit seven", "a handwritten digit two", "--num", "2",
                 "--out", str(tmp_path / "shots"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 4 and result["call"] == recipe["pipeline_kwargs"]
    assert len(list((tmp_path / "shots").glob("0*-a-handwritten-digit-*-seed*.png"))) == 4
    assert Image.open(tmp_path / "shots" / "grid.png").width > 2 * 128  # labelled rows beside two columns
    assert main(["sample", str(run / "final"), "a handwritten digit two", "--steps", "4"]) == 2  # before loading
    assert "trained to sample in 1 step(s) at timesteps [999.0]; leave --steps out" in capsys.readouterr().err

    assert main(["export", str(run / "checkpoints" / "checkpoint-4"), "--out", str(tmp_path / "again"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "ema"  # the run kept an EMA, which its export used
    unet = "unet/diffusion_pytorch_model.safetensors"
    exported, final = load_file(str(tmp_path / "again" / unet)), load_file(str(run / "final" / unet))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
