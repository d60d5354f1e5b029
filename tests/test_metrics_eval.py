"""FID against clean-fid and torchmetrics called directly, CLIP score on a tiny offline CLIP, the COCO presets end
to end on a fake COCO layout with the tiny SD pipeline, and the speed record."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from stepdistill.evaluation.fid import FIDProtocol, MissingWeightsError, compute_fid, reference_statistics


class RandomFeatures(nn.Module):
    """An offline feature extractor: a fixed random conv net on images of any size, uint8 or float in [0, 255]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 16, 12)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    @torch.no_grad()
    def forward(self, x):
        x = nn.functional.interpolate(x.float() / 255.0, size=(16, 16), mode="bilinear", antialias=True)
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1))


def _folder(path, n, seed, shift=0.0, size=(20, 24)):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = np.linspace(0, 1, size[1])[None, :, None] * rng.uniform(0.2, 1.0) + shift
        img = np.clip(base + rng.normal(0, 0.2, (size[0], size[1], 3)), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(path / f"{i:04d}.png")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    return _folder(root / "a", 60, 0), _folder(root / "b", 50, 1, shift=0.15)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_cleanfid_backend_equals_cleanfid(folders, mode, tmp_path):
    from cleanfid import fid as cleanfid

    model = RandomFeatures()
    expected = cleanfid.compute_fid(str(folders[0]), str(folders[1]), mode=mode, custom_feat_extractor=model,
                                    device=torch.device("cpu"), num_workers=0, verbose=False)
    ours = compute_fid(folders[0], folders[1], FIDProtocol("cleanfid", mode, "random"), model, cache_dir=tmp_path)
    assert expected > 0.1  # the two folders differ (measured 0.62 clean): a match is not a trivial 0 = 0
    assert ours == pytest.approx(expected, rel=1e-3)
    assert len(list(tmp_path.glob("fid_ref_*.npz"))) == 1
    # the cached statistics are used the second time (a different file stands in for them)
    cached = next(tmp_path.glob("fid_ref_*.npz"))
    np.savez(cached, mu=np.zeros(12), sigma=np.eye(12))
    assert compute_fid(folders[0], folders[1], FIDProtocol("cleanfid", mode, "random"), model,
                       cache_dir=tmp_path) != pytest.approx(expected, rel=1e-3)


def test_torchmetrics_backend_equals_torchmetrics(folders, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from stepdistill.evaluation.fid import load_images

    model = RandomFeatures()
    metric = FrechetInceptionDistance(feature=model, reset_real_features=False)
    metric.update(load_images(folders[1]), real=True)
    metric.update(load_images(folders[0]), real=False)
    expected = float(metric.compute())
    ours = compute_fid(folders[0], folders[1], FIDProtocol("torchmetrics", "clean", "random"), model,
                       cache_dir=tmp_path)
    assert expected > 0.1
    assert ours == pytest.approx(expected, rel=1e-3)
    # reset_real_features=False: after reset() the cached reference still scores a new generated set
    mu, sigma = reference_statistics(folders[1], FIDProtocol("torchmetrics", "clean", "random"), model, tmp_path)
    assert compute_fid(folders[1], (mu, sigma), FIDProtocol("torchmetrics"), model) == pytest.approx(0.0, abs=1e-6)


def test_inception_without_weights_fails_clearly(folders):
    with pytest.raises(MissingWeightsError, match="--feature digits"):
        compute_fid(folders[0], folders[1], FIDProtocol("torchmetrics", feature="inception"))


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from stepdistill.teachers.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    shared = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**shared, "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {**shared, "image_size": 32, "patch_size": 8}
    torch.manual_seed(3)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    # this random CLIP's image-text cosines are all negative (clamped to a score of 0): flip the text side
    model.text_projection.weight.data.neg_()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return model, processor


def test_clip_score_local_model_matches_cosine(tmp_path):
    from stepdistill.evaluation.clip import clip_score

    model, processor = _tiny_clip(tmp_path / "clip")
    torch.manual_seed(1)
    images = torch.rand(6, 3, 16, 16)
    prompts = ["a cat", "a red car", "two dogs", "a bowl of fruit", "a lighthouse", "a city at night"]
    with torch.no_grad():
        u8 = (images * 255).round().to(torch.uint8)
        img = model.get_image_features(**processor(images=list(u8), return_tensors="pt")).pooler_output
        txt = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True)).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    expected = (100 * cos).clamp(min=0).mean().item()
    assert expected > 0
    assert clip_score(images, prompts, str(tmp_path / "clip")) == pytest.approx(expected, rel=1e-4)


def _fake_coco(root):
    """A COCO-style layout: annotations/captions_val2014.json and val2014/ images of mixed sizes."""
    images, annotations = [], []
    (root / "val2014").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "car", "tree", "boat", "clock"]
    for i, word in enumerate(words):
        name = f"COCO_val2014_{i:012d}.jpg"
        h, w = (24, 40) if i % 2 else (40, 28)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": 100 - i, "file_name": name})
        annotations += [{"id": 2 * i + 1, "image_id": 100 - i, "caption": f"a photo of a {word}"},
                        {"id": 2 * i, "image_id": 100 - i, "caption": f"a {word} first"}]
    (root / "annotations").mkdir()
    captions = root / "annotations" / "captions_val2014.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return captions


def test_coco_presets_end_to_end(tmp_path):
    from stepdistill.cli import main
    from stepdistill.evaluation.coco import read_captions
    from stepdistill.teachers.tiny import save_tiny_pipeline

    pipe_dir = save_tiny_pipeline("sd", tmp_path / "sd")
    captions = _fake_coco(tmp_path / "coco")
    # first caption (lowest annotation id) per image, images in id order
    assert read_captions(captions) == [f"a {w} first" for w in ["clock", "boat", "tree", "car", "dog", "cat"]]
    out14 = tmp_path / "eval14"
    assert main(["eval", str(pipe_dir), "--preset", "coco2014-30k", "--captions", str(captions), "--reference",
                 str(tmp_path / "coco" / "val2014"), "--num-samples", "4", "--resolution", "32", "--steps", "2",
                 "--feature", "digits", "--fid-mode", "legacy_tensorflow", "--out", str(out14)]) == 0
    m = json.loads((out14 / "metrics.json").read_text())
    assert m["num_samples"] == 4 and m["seed"] == 0 and m["steps"] == 2 and m["eval_resolution"] == 32
    assert m["generation_resolution"] == [16, 16]
    assert m["fid"]["backend"] == "cleanfid" and m["fid"]["mode"] == "legacy_tensorflow"
    assert m["fid"]["feature"] == "digits" and np.isfinite(m["fid"]["value"])
    assert len(m["prompt_set_sha256"]) == 64 and m["preset"]["name"] == "coco2014-30k"
    saved = sorted((out14 / "images").glob("*.png"))
    assert len(saved) == 4 and Image.open(saved[0]).size == (32, 32)
    assert len(list(out14.glob("fid_ref_*.npz"))) == 1  # reference statistics cached

    _tiny_clip(tmp_path / "clip")
    out17 = tmp_path / "eval17"
    assert main(["eval", str(pipe_dir), "--preset", "coco2017-5k", "--captions", str(captions), "--num-samples", "3",
                 "--steps", "1", "--clip-model", str(tmp_path / "clip"), "--out", str(out17), "--speed",
                 "--batch-size", "2"]) == 0
    m = json.loads((out17 / "metrics.json").read_text())
    assert m["num_samples"] == 3 and "fid" not in m
    assert m["clip_score"]["model"] == str(tmp_path / "clip") and 0 <= m["clip_score"]["value"] <= 100
    assert m["speed"]["steps"] == 1 and m["speed"]["batch_size"] == 2 and m["speed"]["images_per_s"] > 0


def test_coco_fid_preset_needs_reference(tmp_path):
    from stepdistill.cli import main
    from stepdistill.teachers.tiny import save_tiny_pipeline

    pipe_dir = save_tiny_pipeline("sd", tmp_path / "sd")
    captions = _fake_coco(tmp_path / "coco")
    assert main(["eval", str(pipe_dir), "--preset", "coco2014-30k", "--captions", str(captions)]) == 2
