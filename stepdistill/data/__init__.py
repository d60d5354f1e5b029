"""Data: conditions (prompts, class labels), teacher pair caches, and the one source of real images."""
from stepdistill.data.conditions import (
    DEFAULT_PROMPTS,
    ConditionDataset,
    ConditionSource,
    PromptFile,
    read_prompts,
)
from stepdistill.data.images import ImageFolderDataset, RealImages
from stepdistill.data.pairs import PairDataset, generate_pairs, pair_dir
from stepdistill.data.shards import open_images

__all__ = ["DEFAULT_PROMPTS", "ConditionDataset", "ConditionSource", "ImageFolderDataset", "PairDataset",
           "PromptFile", "RealImages", "generate_pairs", "open_images", "pair_dir", "read_prompts"]
