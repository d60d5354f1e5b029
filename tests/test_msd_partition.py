"""Partitions of the condition space (MSD §3): balanced parts, one rule for training and sampling, saved and
reloaded, deterministic for a seed; a partition restricts the conditions a run samples and nothing else."""
from __future__ import annotations

import pytest
import torch

from stepdistill.config import ConfigError, PartitionConfig, TeacherConfig, load_config
from stepdistill.data import ConditionSource, PairDataset, pair_dir
from stepdistill.data.partition import (
    ClassRanges,
    EmbeddingClusters,
    load_partition,
    pooled_embedding,
    restrict_to_part,
)
from stepdistill.teachers import GaussianMixture, GMMTeacher, load_teacher
from stepdistill.teachers.base import Cond
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer
from stepdistill.training.lean import build

PROMPTS = [f"a photo of a {thing}" for thing in ("cat", "dog", "horse", "bird", "car", "boat", "tree", "house",
                                                  "lake", "city", "bowl of fruit", "mountain")]


def embedded(x: torch.Tensor) -> Cond:
    """A batch whose token states all equal x: its pooled embedding is x at unit length."""
    return Cond({"encoder_hidden_states": x[:, None, :].expand(-1, 3, -1)}, {}, len(x))


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    folder = save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny") / "sd")
    return load_teacher(TeacherConfig(kind="sd", path=str(folder)), "cpu")


@pytest.mark.parametrize("num_classes,parts,sizes", [(8, 4, [2, 2, 2, 2]), (10, 4, [2, 3, 2, 3]), (1000, 4, [250] * 4)])
def test_class_ranges_are_contiguous_balanced_and_route_every_class_to_one_part(num_classes, parts, sizes):
    partition = ClassRanges.fit(num_classes, parts)
    labels = torch.arange(num_classes)
    routed = partition.route(Cond({"class_labels": labels}, {}, num_classes))
    assert torch.bincount(routed, minlength=parts).tolist() == sizes
    assert (routed.diff() >= 0).all() and routed[0] == 0 and routed[-1] == parts - 1  # contiguous, in order


@pytest.mark.parametrize("n,parts", [(10, 2), (10, 5), (999, 4), (2000, 7)])
def test_balanced_clusters_have_equal_sizes_and_the_rule_reproduces_the_fit(n, parts):
    x = torch.randn(n, 16, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    partition = EmbeddingClusters.fit(x, parts, seed=0)
    routed = partition.route(embedded(x))
    counts = torch.bincount(routed, minlength=parts)
    assert counts.max() - counts.min() <= 1, counts


def test_balanced_clusters_are_coherent_and_deterministic_for_a_seed():
    """Four well-separated groups of unequal spread: the balanced clusters recover them exactly; the same seed gives
    the same partition and another seed the same parts (up to their numbering)."""
    g = torch.Generator().manual_seed(1)
    centers = torch.eye(4, 8, dtype=torch.float64) * 3
    x = torch.cat([c + s * torch.randn(50, 8, generator=g, dtype=torch.float64)
                   for c, s in zip(centers, (0.1, 0.2, 0.3, 0.4))])
    group = torch.arange(4).repeat_interleave(50)
    first, again, other = (EmbeddingClusters.fit(x, 4, seed) for seed in (0, 0, 1))
    assert first.same_as(again)
    for p in (first, other):
        routed = p.route(embedded(x))
        assert all(len(routed[group == k].unique()) == 1 for k in range(4)) and len(routed.unique()) == 4


def test_text_partition_of_a_real_teacher_is_saved_reloaded_and_routes_unseen_prompts_by_the_same_rule(
        sd_teacher, tmp_path):
    parts = [ConditionSource(sd_teacher, PROMPTS) for _ in range(3)]
    fitted = [restrict_to_part(s, PartitionConfig(parts=3, part=k), tmp_path) for k, s in enumerate(parts)]
    assert sorted(i for s in parts for i in s.train_indices) == list(range(len(PROMPTS)))  # each in exactly one
    assert [len(s.train_indices) for s in parts] == [4, 4, 4]
    reloaded = load_partition(tmp_path / "partition")
    assert all(reloaded.same_as(p) for p in fitted) and reloaded.meta["sizes"] == [4, 4, 4]
    unseen = ["a red bicycle", "an owl at night", "a photo of a cat"]
    cond = sd_teacher.encode(unseen)
    e = pooled_embedding(cond)
    by_rule = (torch.cdist(e, reloaded.tensors["centers"]) ** 2 - reloaded.tensors["offsets"]).argmin(dim=1)
    assert torch.equal(reloaded.route(cond), by_rule)
    assert int(reloaded.route(sd_teacher.encode(["a photo of a cat"]))) == \
        next(k for k, s in enumerate(parts) if 0 in s.train_indices)


def test_bad_partition_settings_fail_with_the_key_named(sd_teacher, tmp_path):
    with pytest.raises(ConfigError, match="data.partition.part=3 must be below data.partition.parts=3"):
        restrict_to_part(ConditionSource(sd_teacher, PROMPTS), PartitionConfig(parts=3, part=3), tmp_path)
    with pytest.raises(ConfigError, match="data.partition.parts=13 is more than the 12 distinct prompts"):
        restrict_to_part(ConditionSource(sd_teacher, PROMPTS), PartitionConfig(parts=13), tmp_path)
    gmm = GMMTeacher(GaussianMixture.ring(8, num_classes=4))
    with pytest.raises(ConfigError, match="data.partition.parts=5 is more than the teacher's 4 classes"):
        restrict_to_part(ConditionSource(gmm), PartitionConfig(parts=5, part=0), tmp_path)
    with pytest.raises(ConfigError, match="rule=embeddings needs a text teacher"):
        restrict_to_part(ConditionSource(gmm), PartitionConfig(parts=2, rule="embeddings"), tmp_path)


def test_a_part_restricts_the_sampled_conditions_but_not_the_regression_pairs(tmp_path):
    """MSD App. B.2: each student's DM term sees only its part; DMD's paired regression set is not filtered."""
    objective = build("configs/dmd2_gmm.yaml", ["teacher.num_classes=8", "objective.regression_weight=0.25",
                                                "objective.pairs.num=64", "objective.pairs.steps=4"])
    objective.prepare_data(str(tmp_path), "cpu")
    restrict_to_part(objective.source, PartitionConfig(parts=4, part=1), tmp_path)
    sampled = torch.stack([objective.dataset()[i]["cond_index"] for i in range(64)])
    assert set(sampled.tolist()) == {2, 3}
    pairs = PairDataset(pair_dir(objective.config.pairs, tmp_path)).tensors["cond_index"]
    assert set(pairs.tolist()) == set(range(8))


def test_a_partition_of_an_objective_that_trains_on_pair_caches_is_refused(tmp_path):
    cfg = load_config("configs/regression_gmm.yaml", [
        "teacher.num_classes=4", "objective.pairs.num=64", "objective.pairs.steps=2", "data.partition.parts=2",
        f"train.output_dir={tmp_path}", "train.report_to=none", "train.progress=false"])
    with pytest.raises(ConfigError, match="data.partition restricts the conditions an objective samples"):
        Trainer(cfg)
