"""Data that streams: a prompt file of millions of lines costs its line offsets, not its text; its conditions are
dealt to the ranks of the trainer's data loader without duplicates; WebDataset tar shards feed DMD2's GAN real
branch exactly as the same images in a captioned folder do."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from torch.utils.data import DataLoader

from stepdistill.config import load_config
from stepdistill.data import ConditionDataset, ConditionSource, open_images, read_prompts
from stepdistill.objectives import build_objective
from stepdistill.teachers.gmm import GMMTeacher
from stepdistill.teachers.tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
LINES = 2_000_000
MEMORY = '''
import sys
import numpy as np
from stepdistill.data import ConditionDataset, ConditionSource, read_prompts
from stepdistill.teachers.gmm import GMMTeacher

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

teacher = GMMTeacher()
before = rss_mib()
source = ConditionSource(teacher, read_prompts(sys.argv[1]))
dataset = ConditionDataset(source.train_indices)
picked = np.random.default_rng(0).integers(0, len(source), 1000)
prompts = [source.prompts[int(i)] for i in picked]
assert all(p == f"prompt {i} of many" for p, i in zip(prompts, picked)), prompts[:3]
assert len(source) == len(dataset.indices) == LINES and source.identity()[1] == LINES
print(rss_mib() - before)
'''


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="resident memory is read from /proc")
def test_two_million_line_prompt_file_adds_under_50_mb(tmp_path):
    """As a list of str the prompts alone are ~170 MB; lazily, 16 MB of offsets."""
    path = tmp_path / "prompts.txt"
    with path.open("w") as f:
        for start in range(0, LINES, 100_000):
            f.write("".join(f"prompt {i} of many\n" for i in range(start, start + 100_000)))
    proc = subprocess.run([sys.executable, "-c", MEMORY.replace("LINES", str(LINES)), str(path)], cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip()) < 50


def test_prompt_file_reads_like_the_list_it_replaces(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \r\nun café\n")
    prompts = read_prompts(path)
    assert list(prompts) == ["a cat", "a dog", "un café"] and prompts[-1] == "un café"
    teacher = GMMTeacher()
    assert ConditionSource(teacher, prompts).identity() == ConditionSource(teacher, list(prompts)).identity()
    path.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8 text .* at byte 6"):
        read_prompts(path)


def test_conditions_are_dealt_to_ranks_without_duplicates(tmp_path):
    """The trainer's loader (shuffled, drop_last, accelerate's seedable sampler) over a streamed prompt file: two
    ranks see disjoint halves that together are every prompt once per epoch."""
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(64)))
    source = ConditionSource(GMMTeacher(), read_prompts(path))
    seen = []
    for rank in (0, 1):
        dataset = ConditionDataset(source.train_indices, length=len(source))
        loader = prepare_data_loader(DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True),
                                     num_processes=2, process_index=rank, put_on_device=False,
                                     use_seedable_sampler=True)
        seen.append([int(i) for batch in loader for i in batch["cond_index"]])
    assert len(seen[0]) == len(seen[1]) == 32 and not set(seen[0]) & set(seen[1])
    assert sorted(source.prompts[i] for i in seen[0] + seen[1]) == sorted(source.prompts)


def write_shards(folder: Path, images: list[np.ndarray], captions: list[str | None], per_shard: int = 2) -> Path:
    import webdataset as wds

    folder.mkdir()
    for start in range(0, len(images), per_shard):
        with wds.TarWriter(str(folder / f"shard-{start // per_shard:06d}.tar")) as sink:
            for i in range(start, min(start + per_shard, len(images))):
                png = io.BytesIO()
                Image.fromarray(images[i]).save(png, format="PNG")
                sample = {"__key__": f"{i:06d}", "png": png.getvalue()}
                if captions[i] is not None:
                    sample["txt"] = captions[i]
                sink.write(sample)
    return folder


def test_webdataset_shards_feed_the_gan_real_images(tmp_path):
    pytest.importorskip("webdataset")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    captions = ["a red square", "a blue circle", "a green star", "a red square", "a yellow moon"]
    shards = write_shards(tmp_path / "shards", images, captions)
    folder = tmp_path / "folder"  # the same images as a captioned image folder
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:06d}.png", "text": c}) + "\n"
                                                   for i, c in enumerate(captions)))
    teacher = save_tiny_pipeline("sd", tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a dog\n")

    def objective(image_dir: Path, out: Path):
        cfg = load_config("configs/dmd2_sd15.yaml", [
            f"teacher.path={teacher}", f"data.prompts_file={prompts}", "objective.real_data=images",
            f"data.image_dir={image_dir}", f"train.output_dir={out}", "train.mixed_precision='no'"])
        obj = build_objective(cfg, "cpu")
        torch.manual_seed(0)  # the VAE samples its latent distribution
        obj.prepare_data(str(out), "cpu")
        return obj

    from_shards, from_folder = objective(shards, tmp_path / "a"), objective(folder, tmp_path / "b")
    real = from_shards.real.images
    assert real.captions == captions and torch.equal(real.latents, from_folder.real.images.latents)

    drawn = []
    draw = real.draw
    real.draw = lambda n, device: drawn.append(draw(n, device)) or drawn[-1]
    losses = from_shards.loss("critic", {"cond_index": torch.tensor([0, 1])}, 1)
    assert drawn and set(drawn[0][1]) <= set(captions)  # the GAN's real branch drew from the shards
    assert torch.isfinite(losses["gan_d"])


def test_webdataset_captions_are_all_or_none_and_bad_samples_follow_the_policy(tmp_path):
    pytest.importorskip("webdataset")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    write_shards(tmp_path / "some", images, ["a cat", None, "a dog"])
    with pytest.raises(ValueError, match="1 of 3 samples have no caption"):
        open_images(tmp_path / "some")
    assert open_images(write_shards(tmp_path / "none", images, [None] * 3)).captions is None
    with pytest.raises(ValueError, match="3 bad samples .expected 16x16"):
        open_images(tmp_path / "none", resolution=16)
    assert len(open_images(tmp_path / "none", resolution=8)) == 3
