"""The project's own text speaks of the project (what is measured, what is not yet and how to run it), and the
README keeps its GPU path: where prompts come from, how the teacher is fetched, what the planner says, the command,
and the paper's FIDs labelled as the paper's beside ours."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXTS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
# words about how or by whom the work was done, not about the project
ABOUT_THE_WORK = re.compile(r"\b(this session|sessions?|device tool|lent|was drawn|not drawn|the filer)\b", re.I)


def test_project_text_speaks_of_the_project():
    found = [f"{p.name}:{n}: {line.strip()[:80]}" for p in TEXTS
             for n, line in enumerate(p.read_text().splitlines(), 1) if ABOUT_THE_WORK.search(line)]
    assert not found, found


def test_readme_has_a_gpu_path_for_sd15_and_sdxl():
    readme = (REPO / "README.md").read_text()
    gpu = readme[readme.index("## Distill SD1.5 or SDXL on a GPU"):]
    for needed in ("stepdistill prompts", "hf download", "stepdistill plan --config dmd2_sd15",
                   "stepdistill plan --config dmd2_sdxl_1step", "-m stepdistill train --config dmd2_sd15",
                   "FID in the paper", "8.35", "19.01", "not yet measured"):
        assert needed in gpu, needed
