"""The scripts under ``benchmarks/scripts`` and the commands the benchmark docs give: each
script answers ``--help`` without starting its experiment, and each command a doc gives
names a script and optimizers that exist, unless the doc says it no longer runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alsals_bench.registry import GROUPS, get_optimizer

BENCHMARKS = Path(__file__).resolve().parents[1]
SCRIPTS = BENCHMARKS / "scripts"
DOCS = [*sorted((BENCHMARKS / "docs").glob("*.md")), BENCHMARKS / "README.md"]


@pytest.mark.parametrize(
    "script",
    [
        "batches_at_the_floor.py",
        "cap_cost.py",
        "losses_with_a_domain.py",
        "nonsmooth_losses.py",
        "tiny_model_cost.py",
        "wrong_floor.py",
    ],
)
def test_a_script_answers_help_without_running_its_experiment(script):
    """Five of these ignored ``--help`` and ran for up to minutes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script}") and "|---|" not in done.stdout


def _blocks(text: str) -> list[tuple[str, str]]:
    """Each bash block of a markdown text, with the paragraph before it."""
    paragraphs = text.split("\n\n")
    return [
        (paragraphs[i - 1] if i else "", paragraph)
        for i, paragraph in enumerate(paragraphs)
        if paragraph.startswith("```bash")
    ]


def _optimizers(command: str) -> list[str]:
    """The names after ``--optimizers`` in one command (placeholders such as ``<a row>``
    and the pseudo-name ``adam-tuned`` left out)."""
    found = re.search(r"--optimizers\s+((?:[^-\s#][^\s#]*\s*)+)", command)
    names = [n for item in (found.group(1).split() if found else []) for n in item.split(",")]
    return [
        n for n in names if n and n != "adam-tuned" and n not in GROUPS and not {"<", ">"} & set(n)
    ]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_the_commands_a_doc_gives_still_run_or_it_says_they_do_not(doc):
    """method.md ran ``schedule_free_search.py`` (removed) and two rows that no longer
    exist, as if they were there."""
    for before, block in _blocks(doc.read_text()):
        if "no longer run" in " ".join(before.split()):
            continue  # the record of what ran, said to be one
        for script in re.findall(r"benchmarks/scripts/\w+\.py", block):
            assert (BENCHMARKS.parent / script).is_file(), f"{doc.name}: {script}"
        for command in block.replace("\\\n", " ").splitlines():
            if "alsals-bench run" in command:
                for name in _optimizers(command):
                    get_optimizer(name)  # a ValueError names what is missing
