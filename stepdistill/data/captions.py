"""A prompts file (one prompt per line, what `data.prompts_file` reads) from a captions source: a COCO captions file
(`captions_train2014.json`), a CSV/TSV or Parquet table with a captions column (LAION metadata: `TEXT`), JSON
lines, or plain text. Captions are put on one line each, empty ones dropped, exact repeats kept once; `limit` keeps a
seeded random subset in the source's order. `stepdistill prompts` is the command."""
from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from stepdistill.config import ConfigError
from stepdistill.io import write_atomic

# the captions column a table is searched for when none is given: LAION's metadata, then common names
COLUMNS = ("TEXT", "caption", "text", "prompt", "captions")


def _coco(path: Path) -> Iterator[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): give a COCO captions file as downloaded") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ConfigError(f"{path} is not a COCO captions file (no 'annotations' list): give "
                          "annotations/captions_train2014.json, a CSV/Parquet table or a text file")
    for ann in sorted(data["annotations"], key=lambda a: a.get("id", 0)):
        yield ann.get("caption", "")


def _column(names: list[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in names:
            raise ConfigError(f"{path} has no column {column!r} (columns: {', '.join(names)}): give --column NAME")
        return column
    found = next((c for c in COLUMNS if c in names), None)
    if found is None:
        raise ConfigError(f"{path}: no captions column among {', '.join(names)}: give --column NAME")
    return found


def _table(path: Path, column: str | None) -> Iterator[str]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        name = _column(list(reader.fieldnames or []), column, path)
        for row in reader:
            yield row[name] or ""


def _parquet(path: Path, column: str | None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow: pip install 'stepdistill[parquet]' (or pyarrow), "
                          "or give a CSV") from e
    table = pq.ParquetFile(path)
    name = _column(table.schema_arrow.names, column, path)
    for batch in table.iter_batches(columns=[name]):
        yield from (value or "" for value in batch.column(0).to_pylist())


def _jsonl(path: Path, column: str | None) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path} line {number} is not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise ConfigError(f"{path} line {number} is not a JSON object: give one object a line")
                yield row.get(_column(list(row), column, path)) or ""


def read_captions(path: str | Path, column: str | None = None) -> Iterator[str]:
    """The raw captions of a source, by its suffix (.json COCO, .csv/.tsv, .parquet, .jsonl, else plain text)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"captions source {path} does not exist: give a COCO captions JSON, a CSV/Parquet table "
                          "or a text file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _coco(path)
    if suffix in (".csv", ".tsv"):
        return _table(path, column)
    if suffix == ".parquet":
        return _parquet(path, column)
    if suffix == ".jsonl":
        return _jsonl(path, column)
    return iter(path.read_text(encoding="utf-8").splitlines())


def clean(captions: Iterable[str]) -> tuple[list[str], int, int]:
    """(the prompts: whitespace collapsed to single spaces, empty ones and exact repeats dropped; empty, repeats)."""
    prompts, seen, empty, repeats = [], set(), 0, 0
    for caption in captions:
        prompt = " ".join(str(caption).split())
        if not prompt:
            empty += 1
        elif prompt in seen:
            repeats += 1
        else:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts, empty, repeats


def write_prompts(source: str | Path, out: str | Path, column: str | None = None, limit: int | None = None,
                  seed: int = 0) -> dict:
    """Write the cleaned prompts of `source` to `out`, one a line (atomically); `limit` keeps that many, drawn with
    random.Random(seed) and kept in the source's order. Returns what was written and what was dropped."""
    prompts, empty, repeats = clean(read_captions(source, column))
    if not prompts:
        raise ConfigError(f"captions source {source} holds no caption")
    if limit is not None and limit < len(prompts):
        prompts = [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), limit))]
    write_atomic(out, "\n".join(prompts) + "\n")
    return {"out": str(out), "prompts": len(prompts), "empty_dropped": empty, "repeats_dropped": repeats}
