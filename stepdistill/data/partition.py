"""Partitions of the condition space for multi-student distillation (MSD: Song et al., "Multi-student Diffusion
Distillation for Better One-step Generators", ICML 2025, arXiv 2410.23274, §3): K disjoint, balanced, coherent
parts, and one rule that routes any condition (a training condition or an unseen one at sampling time) to exactly
one part.

- `ClassRanges` (class-conditional teachers): contiguous class ranges, as the paper's ImageNet split (250
  consecutive classes per student for K = 4); sizes differ by at most one.
- `EmbeddingClusters` (text teachers): balanced k-means of the teacher's own text embeddings, mean-pooled over the
  tokens the backbone sees (masked where the teacher gives a mask; SD1.5 has no pooled embedding) and scaled to
  unit length. The paper rejected plain k-means for its uneven cluster sizes and does not specify its split; here
  a condition goes to argmin_k ||e - c_k||^2 - b_k, with offsets b that make the training conditions fall into
  equal parts (the dual variables of the balanced assignment), so the same rule routes unseen prompts.

A fitted partition is saved as `partition.json` + `partition.safetensors`, keyed by the teacher, the conditions,
the number of parts, the rule and the seed, and is deterministic for a seed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from stepdistill.config import ConfigError
from stepdistill.io import atomic_directory
from stepdistill.teachers.base import Cond, Teacher

META_FILE, TENSOR_FILE = "partition.json", "partition.safetensors"
RULES = ("classes", "embeddings")
ENCODE_BATCH = 256  # prompts encoded per teacher call while routing
MAX_FIT = 100_000  # at most this many distinct prompts (a seeded subsample) fit the clusters
KMEANS_ITERATIONS = 50
BALANCE_SWEEPS = 200


class Partition:
    """K parts of a teacher's condition space; `route` sends each condition of a batch to one part."""

    rule: ClassVar[str]

    def __init__(self, num_parts: int, tensors: dict[str, Tensor], meta: dict | None = None) -> None:
        self.num_parts, self.tensors, self.meta = num_parts, tensors, dict(meta or {})

    def route(self, cond: Cond) -> Tensor:
        """The part [B] (int64) of every condition of an encoded batch."""
        raise NotImplementedError

    def route_conditions(self, teacher: Teacher, conditions: list | Tensor) -> Tensor:
        """The part of raw conditions (prompts or class labels), encoded by `teacher` in batches."""
        parts = [self.route(teacher.encode(conditions[i:i + ENCODE_BATCH], cache=False))
                 for i in range(0, len(conditions), ENCODE_BATCH)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def save(self, folder: str | Path) -> Path:
        """Write partition.json and partition.safetensors into `folder`, atomically."""
        with atomic_directory(folder) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / TENSOR_FILE))
            (tmp / META_FILE).write_text(json.dumps({"rule": self.rule, "num_parts": self.num_parts, **self.meta},
                                                    indent=2))
        return Path(folder)

    def same_as(self, other: Partition) -> bool:
        return (self.rule, self.num_parts) == (other.rule, other.num_parts) and self.tensors.keys() == \
            other.tensors.keys() and all(torch.equal(v, other.tensors[k]) for k, v in self.tensors.items())


class ClassRanges(Partition):
    """Contiguous class ranges: part k holds classes [boundaries[k], boundaries[k + 1])."""

    rule = "classes"

    @classmethod
    def fit(cls, num_classes: int, num_parts: int) -> ClassRanges:
        if num_parts > num_classes:
            raise ConfigError(f"data.partition.parts={num_parts} is more than the teacher's {num_classes} classes: "
                              f"use at most {num_classes} parts")
        boundaries = torch.tensor([k * num_classes // num_parts for k in range(num_parts + 1)])
        return cls(num_parts, {"boundaries": boundaries})

    def route(self, cond: Cond) -> Tensor:
        labels = cond.fields["class_labels"].cpu()
        boundaries = self.tensors["boundaries"]
        if labels.numel() and (labels.min() < 0 or labels.max() >= boundaries[-1]):
            raise ValueError(f"class labels must lie in [0, {int(boundaries[-1])}) to be routed")
        return torch.searchsorted(boundaries, labels, right=True) - 1


def pooled_embedding(cond: Cond) -> Tensor:
    """The teacher's text embedding of each condition, mean-pooled over its tokens (masked where the teacher gives
    an attention mask), unit length, float64 [B, D]."""
    h = cond.fields["encoder_hidden_states"].double().cpu()
    mask = cond.fields.get("encoder_attention_mask")
    if mask is None:
        pooled = h.mean(dim=1)
    else:
        m = mask.double().cpu()[..., None]
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)


class EmbeddingClusters(Partition):
    """Balanced clusters of pooled text embeddings: part = argmin_k ||e - centers_k||^2 - offsets_k."""

    rule = "embeddings"

    def route(self, cond: Cond) -> Tensor:
        e = pooled_embedding(cond)
        return (torch.cdist(e, self.tensors["centers"]) ** 2 - self.tensors["offsets"]).argmin(dim=1)

    @classmethod
    def fit(cls, embeddings: Tensor, num_parts: int, seed: int) -> EmbeddingClusters:
        """Balanced k-means (k-means++ seeding from a generator seeded with `seed`): Lloyd iterations whose
        assignment step is the balanced assignment argmin_k d_ik - b_k (`balance_offsets`)."""
        x = embeddings.double()
        g = torch.Generator().manual_seed(seed)
        centers = kmeans_plus_plus(x, num_parts, g)
        sizes = balanced_sizes(len(x), num_parts)
        for _ in range(KMEANS_ITERATIONS):
            d = torch.cdist(x, centers) ** 2
            assign = (d - balance_offsets(d, sizes)).argmin(dim=1)
            moved = torch.stack([x[assign == k].mean(dim=0) if (assign == k).any() else centers[k]
                                 for k in range(num_parts)])
            if torch.allclose(moved, centers, atol=1e-10):
                break
            centers = moved
        offsets = balance_offsets(torch.cdist(x, centers) ** 2, sizes)
        return cls(num_parts, {"centers": centers, "offsets": offsets})


def balanced_sizes(n: int, k: int) -> list[int]:
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def kmeans_plus_plus(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next center drawn with probability ~ squared distance
    to the nearest chosen one."""
    chosen = [int(torch.randint(0, len(x), (1,), generator=g))]
    for _ in range(1, k):
        d = (torch.cdist(x, x[chosen]) ** 2).min(dim=1).values
        p = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1.0 / len(d))
        chosen.append(int(torch.multinomial(p, 1, generator=g)))
    return x[chosen].clone()


def balance_offsets(d: Tensor, sizes: list[int]) -> Tensor:
    """Offsets b [K] such that argmin_k d_ik - b_k puts sizes[k] of the N points into part k: coordinate ascent on
    the dual of the balanced assignment (min sum d_i,a(i) subject to the part sizes). Each update sets b_k midway
    between the sizes[k]-th and the next point's threshold for joining k, the other offsets fixed; sweeps repeat
    until the sizes hold (distinct points converge in a few sweeps; tied points may stay off by a few)."""
    n, k = d.shape
    b = torch.zeros(k, dtype=d.dtype)
    for _ in range(BALANCE_SWEEPS):
        for j in range(k):
            others = d - b
            others[:, j] = torch.inf
            threshold = (d[:, j] - others.min(dim=1).values).sort().values  # point i joins j iff b_j > threshold_i
            m = sizes[j]
            low = threshold[m - 1] if m > 0 else threshold[0] - 1.0
            high = threshold[m] if m < n else low + 1.0
            b[j] = (low + high) / 2
        if torch.bincount((d - b).argmin(dim=1), minlength=k).tolist() == sizes:
            break
    return b


# ------------------------------------------------------------------ fitting a source's conditions
PARTITIONS: dict[str, type[Partition]] = {c.rule: c for c in (ClassRanges, EmbeddingClusters)}


def partition_rule(teacher: Teacher, rule: str) -> str:
    """The rule `auto` means for this teacher: class ranges for class-conditional teachers, embeddings for text."""
    if rule == "auto":
        rule = "embeddings" if teacher.needs_prompts else "classes"
    if rule == "classes" and not teacher.num_classes:
        raise ConfigError("data.partition.rule=classes needs a class-conditional teacher (e.g. teacher.num_classes "
                          "> 0 for the GMM teacher): use data.partition.rule=embeddings for a text teacher")
    if rule == "embeddings" and not teacher.needs_prompts:
        raise ConfigError("data.partition.rule=embeddings needs a text teacher: use data.partition.rule=classes")
    return rule


def fit_partition(source, num_parts: int, rule: str, seed: int) -> Partition:
    """Fit a partition of a ConditionSource's conditions (its prompts, or its classes)."""
    teacher = source.teacher
    rule = partition_rule(teacher, rule)
    if rule == "classes":
        return ClassRanges.fit(teacher.num_classes, num_parts)
    distinct = list(dict.fromkeys(source.prompts))
    if num_parts > len(distinct):
        raise ConfigError(f"data.partition.parts={num_parts} is more than the {len(distinct)} distinct prompts: use "
                          f"at most {len(distinct)} parts or a longer prompt file")
    if len(distinct) > MAX_FIT:
        pick = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed))[:MAX_FIT]
        distinct = [distinct[int(i)] for i in pick.sort().values]
    pooled = torch.cat([pooled_embedding(teacher.encode(distinct[i:i + ENCODE_BATCH], cache=False))
                        for i in range(0, len(distinct), ENCODE_BATCH)])
    return EmbeddingClusters.fit(pooled, num_parts, seed)


def load_partition(folder: str | Path) -> Partition:
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {META_FILE}: it is not a saved partition")
    meta = json.loads((folder / META_FILE).read_text())
    rule, num_parts = meta.pop("rule"), meta.pop("num_parts")
    if rule not in PARTITIONS:
        raise ValueError(f"{folder / META_FILE}: unknown partition rule {rule!r} (known: {list(PARTITIONS)})")
    return PARTITIONS[rule](num_parts, load_file(str(folder / TENSOR_FILE)), meta)


def partition_key(source, num_parts: int, rule: str, seed: int) -> str:
    settings = {"teacher": source.teacher.identity or type(source.teacher).__name__, "parts": num_parts,
                "rule": partition_rule(source.teacher, rule), "seed": seed, "conditions": source.identity()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def partition_dir(cfg, output_dir: str | Path) -> Path:
    """Where a partition section's fitted partition lives: its own `dir`, else <output_dir>/partition."""
    return Path(cfg.dir) if cfg.dir else Path(output_dir) / "partition"


def check_partition_config(cfg) -> None:
    if cfg.part >= cfg.parts:
        raise ConfigError(f"data.partition.part={cfg.part} must be below data.partition.parts={cfg.parts} (parts "
                          f"are numbered 0..{cfg.parts - 1})")


def restrict_to_part(source, cfg, output_dir: str | Path) -> Partition | None:
    """Fit (or reuse) the partition a PartitionConfig describes and restrict `source` to the conditions of its
    `part`; None (and every condition) when `parts` is 1. Restriction is of the conditions a run samples, not of
    the conditions a source can encode: caches of teacher pairs keep every condition (MSD App. B.2)."""
    if cfg.parts == 1:
        return None
    check_partition_config(cfg)
    folder = partition_dir(cfg, output_dir)
    key = partition_key(source, cfg.parts, cfg.rule, cfg.seed)
    partition = load_partition(folder) if (folder / META_FILE).is_file() else None
    if partition is not None and partition.meta.get("key") == key:
        parts = partition.route_conditions(source.teacher, source.conditions())
    else:
        partition = fit_partition(source, cfg.parts, cfg.rule, cfg.seed)
        parts = partition.route_conditions(source.teacher, source.conditions())
        partition.meta.update(key=key, seed=cfg.seed, num_conditions=len(parts),
                              sizes=torch.bincount(parts, minlength=cfg.parts).tolist())
        partition.save(folder)
    indices = torch.nonzero(parts == cfg.part).flatten().tolist()
    if not indices:
        raise ConfigError(f"data.partition.part={cfg.part} holds no condition: use fewer data.partition.parts")
    source.restrict(indices)
    return partition
