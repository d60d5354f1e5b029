"""The shipped digits teacher and classifier, the `stepdistill teacher digits` command, and the demo through the
CLI in a few steps."""
import json

import torch

from stepdistill.cli import main
from stepdistill.miniature import get_dataset
from stepdistill.miniature.dataset import sample_pipeline
from stepdistill.miniature.digits import digit_prompt

DIGITS = get_dataset("digits")


def test_splits_are_disjoint_and_prompts_name_digits():
    train, _ = DIGITS.load_images("train")
    test, _ = DIGITS.load_images("test")
    assert train.shape[1:] == (3, 16, 16) and len(train) + len(test) == 1797
    assert 0 <= train.min() and train.max() <= 1
    assert not any(torch.equal(test[0], x) for x in train)  # the held-out split is not in training
    assert DIGITS.prompts[7] == "a handwritten digit seven"


def test_shipped_classifier_reads_held_out_digits():
    from stepdistill.evaluation.miniature import prompt_accuracy
    from stepdistill.miniature.classifier import ClassifierFeatures

    x, y = DIGITS.load_images("test")
    model = ClassifierFeatures(DIGITS.classifier_dir)
    assert prompt_accuracy(x, y, model) >= 0.97
    feats = model((x[:64] * 255).round().to(torch.uint8))
    assert feats.shape == (64, 64) and (feats < 0).any()  # pre-activation: not ReLU-clipped


def test_shipped_teacher_is_a_plain_sd_pipeline_that_draws_the_prompted_digit():
    from diffusers import StableDiffusionPipeline

    from stepdistill.evaluation.miniature import prompt_accuracy
    from stepdistill.miniature.classifier import ClassifierFeatures

    pipe = StableDiffusionPipeline.from_pretrained(str(DIGITS.teacher_dir))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(DIGITS.prompts), "cpu", 1, False)
    distance = torch.cdist(embeds.flatten(1), embeds.flatten(1))
    assert distance[~torch.eye(10, dtype=torch.bool)].min() > 1.0  # the ten prompts condition differently
    labels = torch.arange(10).repeat(3)
    images = sample_pipeline(pipe, DIGITS, labels, steps=20, guidance=3.0, seed=5)
    assert prompt_accuracy(images, labels, ClassifierFeatures(DIGITS.classifier_dir)) >= 0.9


def test_demo_through_the_cli_in_a_few_steps(tmp_path, capsys):
    from PIL import Image

    from stepdistill.pipelines import load_exported

    out = tmp_path / "demo"
    assert main(["demo", "--eval-per-digit", "2", "train.max_steps=2", "train.batch_size=4",
                 "objective.pairs.num=8", "objective.pairs.steps=2", f"train.output_dir={out}",
                 "train.device_threads=1"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and "| student 1-step (DMD2) | 1 |" in printed.err  # the table on stderr, as --json is not
    metrics = json.loads((out / "metrics.json").read_text())
    # the warm start: a regression stage, then DMD2 from its export, whose export the demo evaluates
    assert json.loads((out / "regression" / "stage.json").read_text())["steps"] == 2
    dmd2_config = json.loads((out / "dmd2" / "config.json").read_text())
    assert dmd2_config["student"]["init"] == str(out / "regression" / "final")
    assert metrics["export"] == str(out / "dmd2" / "final")
    rows = metrics["metrics"]
    assert list(rows) == ["teacher 50-step DDIM", "teacher 1-step DDIM", "student 1-step (DMD2)"]
    assert rows["student 1-step (DMD2)"]["steps"] == 1 and rows["student 1-step (DMD2)"]["guidance_scale"] == 0
    for row in rows.values():
        assert 0 <= row["prompt_accuracy"] <= 1 and row["fid_vs_teacher50"] > 0 and row["images_per_s"] > 0
    assert metrics["floors"]["fid_teacher_vs_teacher"] > 0
    assert "student 1-step (DMD2)" in (out / "metrics.md").read_text()
    width, height = Image.open(out / "samples.png").size
    assert width > 10 * 128 and height > 3 * 128  # 3 rows of the 10 prompts, upscaled from 16 pixels, labelled
    pipe, recipe = load_exported(out / "dmd2" / "final")
    image = pipe(digit_prompt(3), output_type="pt", **recipe["pipeline_kwargs"]).images
    assert image.shape == (1, 3, 16, 16)

    eval_dir = tmp_path / "eval"
    assert main(["eval", str(out / "dmd2" / "final"), "--preset", "digits", "--num-samples", "2",
                 "--out", str(eval_dir)]) == 0
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert result["steps"] == 1 and result["num_samples"] == 20 and "fid_teacher_vs_teacher" in result["floors"]


def test_real_digits_folder_is_captioned_by_the_prompts(tmp_path):
    """`write_image_folder` is the GAN's real branch (`data.image_dir`): every image of the split, each captioned by
    its class prompt, pixel values kept to 1/255."""
    import numpy as np
    from PIL import Image

    folder = DIGITS.write_image_folder(tmp_path / "real", "test")
    images, labels = DIGITS.load_images("test")
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == len(images) == len(list(folder.glob("*.png")))
    assert [line["text"] for line in lines] == [DIGITS.prompts[int(label)] for label in labels]
    first = np.asarray(Image.open(folder / lines[0]["file_name"]), dtype=np.float32) / 255
    assert np.abs(first - images[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
