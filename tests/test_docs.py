"""Every figure in README.md and docs/*.md that tools/sync_results.py tracks equals its committed results file.

Conventions (tools/sync_results.py): a `<!-- results: FILE [## heading] -->` block is a table copied verbatim from
FILE; a `<!-- numbers: FILE... -->` block is prose whose every number occurs in one of the FILEs. README's sections
that report measurements keep all their measured figures inside such blocks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import sync_results  # noqa: E402

# README sections made of measurements: outside the marked blocks they may hold no measured-looking figure.
MEASURED_SECTIONS = ["## What the demo printed", "## Benchmarks"]
# A decimal, a ratio (3x, 0.8x), a percentage or a number with a unit of time, size or bandwidth.
MEASURED = re.compile(r"(?<![\w.])\d+\.\d+|(?<![\w.])\d+(?:\.\d+)?(?:x\b|%| ?(?:ms|s|min|minutes|MiB|KiB|GB/s)\b)")


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    following = re.search(r"^## ", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + following.start()] if following else text[start:]


def test_results_and_numbers_blocks_match_the_committed_files():
    problems = [p for path in sync_results.markdown_files() for p in sync_results.sync_file(path, check=True)]
    assert not problems, "\n".join(map(str, problems))


def test_measured_sections_quote_figures_only_inside_marked_blocks():
    text = _readme()
    for heading in MEASURED_SECTIONS:
        outside = sync_results.BLOCK.sub("", _section(text, heading))
        stray = [line for line in outside.splitlines() if MEASURED.search(line)]
        assert not stray, f"{heading}: figures outside a results/numbers block:\n" + "\n".join(stray)


def test_every_cited_results_file_is_committed():
    cited = {path for match in sync_results.BLOCK.finditer(_readme()) for path in match.group(2).split()[:1]}
    cited |= {
        path
        for match in sync_results.BLOCK.finditer(_readme())
        if match.group(1) == "numbers"
        for path in match.group(2).split()
    }
    assert cited, "README cites no results file"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", *sorted(cited)], cwd=ROOT, capture_output=True, text=True
    )
    assert tracked.returncode == 0, tracked.stderr


def test_the_tool_copies_a_table_and_reports_a_stale_one(tmp_path, monkeypatch):
    results = tmp_path / "bench.md"
    results.write_text("# Bench\n\n## case A\n\n| impl | ms |\n|---|---:|\n| lowbit | 1.50 |\n\n## case B\n\n| x |\n")
    monkeypatch.setattr(sync_results, "ROOT", str(tmp_path))
    doc = (
        "intro\n<!-- results: bench.md ## case A -->\n| impl | ms |\n|---|---:|\n| lowbit | 9.99 |\n<!-- /results -->\n"
    )
    _, problems = sync_results.sync_text(doc, "doc.md", check=True)
    assert len(problems) == 1 and "differs" in problems[0].message
    fixed, problems = sync_results.sync_text(doc, "doc.md", check=False)
    assert "| lowbit | 1.50 |" in fixed and "9.99" not in fixed
    assert sync_results.sync_text(fixed, "doc.md", check=True)[1] == []


@pytest.mark.parametrize(
    "prose, missing",
    [("lowbit takes 1.50 ms (1.5 too)", []), ("lowbit takes 1.4 ms, 3.2x faster", ["1.4", "3.2"])],
)
def test_numbers_blocks_accept_only_figures_of_their_files(tmp_path, monkeypatch, prose, missing):
    (tmp_path / "bench.md").write_text("| lowbit | 1.50 |\n")
    monkeypatch.setattr(sync_results, "ROOT", str(tmp_path))
    assert sync_results.check_numbers("bench.md", prose) == missing
