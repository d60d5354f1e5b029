"""The shapes world: a deterministic, balanced procedural dataset with a held-out split; its shipped classifier
reads held-out shapes and misreads melted or colourless ones; `stepdistill teacher digits|shapes` rebuilds a tiny
teacher bit for bit; the shipped teacher's own 50-step samples score through `evaluate_student` and `stepdistill eval`."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.evaluation.miniature import factor_accuracies, predictions, prompt_accuracy
from stepdistill.miniature import DATASETS, get_dataset
from stepdistill.miniature.classifier import ClassifierFeatures, blur
from stepdistill.miniature.shapes import COLOURS, render

SHAPES = get_dataset("shapes")


def test_dataset_is_deterministic_balanced_and_held_out():
    train, labels = SHAPES.load_images("train")
    again, labels_again = SHAPES.load_images("train")
    assert torch.equal(train, again) and torch.equal(labels, labels_again)
    test, test_labels = SHAPES.load_images("test")
    assert train.shape == (4800, 3, 16, 16) and test.shape == (800, 3, 16, 16)
    assert 0 <= train.min() and train.max() <= 1
    assert torch.bincount(labels).tolist() == [300] * 16 and torch.bincount(test_labels).tolist() == [50] * 16
    assert torch.cdist(test.flatten(1), train.flatten(1)).min() > 0.1  # no held-out image is a training image
    some = torch.tensor([0, 5, 10, 15])
    first = render(some, torch.Generator().manual_seed(7))
    assert torch.equal(first, render(some, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, render(some, torch.Generator().manual_seed(8)))


def test_prompts_name_colour_and_shape_and_the_images_have_that_colour():
    assert SHAPES.prompts[2] == "a red triangle" and SHAPES.prompts[13] == "a yellow square"
    factors = SHAPES.factor_labels(torch.tensor([2, 13]))
    assert factors["colour"].tolist() == [0, 3] and factors["shape"].tolist() == [2, 1]
    images, labels = SHAPES.load_images("test")
    palette = torch.tensor(list(COLOURS.values()))
    foreground = images.amax(1, keepdim=True) > 0.5  # every colour has a channel >= 0.75; the background <= 0.15
    mean = (images * foreground).sum((2, 3)) / foreground.sum((2, 3))
    nearest = torch.cdist(mean, palette).argmin(1)
    assert torch.equal(nearest, SHAPES.factor_labels(labels)["colour"])
    for dataset in DATASETS.values():  # the demo's prompt files are the datasets' prompts
        assert dataset.prompts_file.read_text().splitlines() == list(dataset.prompts)


def test_shipped_classifier_reads_held_out_shapes_and_misreads_melted_or_grey_ones():
    model = ClassifierFeatures(SHAPES.classifier_dir)
    images, labels = SHAPES.load_images("test")
    info = json.loads((SHAPES.classifier_dir / "info.json").read_text())
    assert prompt_accuracy(images, labels, model) == pytest.approx(info["test_accuracy"], abs=2e-3)
    assert info["test_accuracy"] >= 0.99
    # blurred into blobs (sigma 3 px), the shape is lost: measured shape accuracy 0.47 (0.68 at sigma 2), chance 0.25
    melted = factor_accuracies(predictions(blur(images, torch.full((len(images),), 3.0)), model), labels, SHAPES)
    assert melted["shape_accuracy"] <= 0.55 and melted["colour_accuracy"] >= 0.95
    grey = factor_accuracies(predictions(images.mean(1, keepdim=True).expand(-1, 3, -1, -1), model), labels, SHAPES)
    assert grey["colour_accuracy"] <= 0.45 and grey["shape_accuracy"] >= 0.9  # no colour: the colour is lost
    feats = model((images[:64] * 255).round().to(torch.uint8))
    assert feats.shape == (64, 64) and (feats < 0).any()  # pre-activation features


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_teacher_command_rebuilds_a_tiny_teacher_bit_for_bit(tmp_path, name):
    from diffusers import StableDiffusionPipeline

    dataset = get_dataset(name)
    classifier = tmp_path / "classifier"
    shutil.copytree(dataset.classifier_dir, classifier)  # reused: the command trains one only when missing
    args = ["teacher", name, "--seed", "3", "--vae-steps", "2", "--unet-steps", "2", "--eval-per-digit", "1",
            "--reference-per-digit", "1", "--device", "cpu", "--classifier-out", str(classifier)]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / weights)), load_file(str(tmp_path / "b" / weights))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_a, ref_b = (np.load(tmp_path / d / dataset.reference_name) for d in "ab")
    assert all(np.array_equal(ref_a[k], ref_b[k]) for k in ref_a.files)
    assert int(ref_a["num_samples"]) == len(dataset.prompts)
    assert ("teacher_shape_accuracy" in ref_a.files) == (name == "shapes")
    report = json.loads((tmp_path / "a" / "training.json").read_text())
    assert report["command"].startswith(f"stepdistill teacher {name} --seed 3") and report["unet_steps"] == 2
    assert report["dataset"] == name and "prompt_accuracy_ddim50_cfg3" in report
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a"))
    assert pipe.tokenizer.model_max_length == dataset.text_max_length


def test_shipped_teacher_draws_the_prompted_coloured_shape(tmp_path):
    from stepdistill.evaluation.miniature import evaluate_student

    metrics = evaluate_student(SHAPES.teacher_dir, "shapes", per_class=3)  # a plain pipeline: 50 steps, CFG 3
    assert metrics["steps"] == 50 and metrics["guidance_scale"] == 3.0 and metrics["num_samples"] == 48
    assert metrics["prompt_accuracy"] >= 0.9
    assert metrics["colour_accuracy"] >= metrics["prompt_accuracy"] and metrics["shape_accuracy"] >= 0.9
    assert 0 < metrics["fid_vs_teacher50"] and 0 < metrics["fid_vs_real"]
    assert metrics["floors"]["fid_teacher_vs_teacher"] > 0 and metrics["floors"]["fid_real_vs_real"] > 0

    out = tmp_path / "eval"
    assert main(["eval", str(SHAPES.teacher_dir), "--preset", "shapes", "--steps", "1", "--num-samples", "1",
                 "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["preset"] == "shapes" and result["steps"] == 1 and result["num_samples"] == 16
    assert result["fid_vs_teacher50"] > metrics["fid_vs_teacher50"]  # one DDIM step is far from 50


def test_the_command_line_offers_every_world_and_coco_preset():
    """The parser spells the names itself (no torch for --help): they must stay those of the registries."""
    from stepdistill.cli import COCO_PRESETS, MINIATURE_WORLDS
    from stepdistill.evaluation.coco import PRESETS

    assert set(MINIATURE_WORLDS) == set(DATASETS) and set(COCO_PRESETS) == set(PRESETS)


def test_eval_takes_every_world_classifier_as_fid_features():
    """`stepdistill eval --feature NAME` (the offline FID features its own error message suggests) for every world."""
    from stepdistill.cli import build_parser

    for name in DATASETS:
        args = build_parser().parse_args(["eval", "some/pipeline", "--preset", "coco2017-5k", "--feature", name])
        assert args.feature == name
