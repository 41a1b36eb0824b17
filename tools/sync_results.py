"""Keeps the numbers in README.md and docs/*.md equal to the committed results files that scripts wrote.

Two kinds of marked blocks, in any Markdown file of the project:

    <!-- results: bench/results/packed_cpu.md ## M=1, K=N=4096 -->
    | ...a table, copied verbatim by this script... |
    <!-- /results -->

  The block is the first table (consecutive lines starting with "|") of the results file under the given heading
  line (the text after the path; no heading: the file's first table). `python tools/sync_results.py` rewrites every
  such block from its file; `--check` only reports stale blocks (tests/test_docs.py runs it).

    <!-- numbers: bench/results/memory_cpu.md docs/demo/report.md -->
    Prose that quotes figures ...
    <!-- /numbers -->

  Every number written in the block (3.5, 2,624, 10.1x, 95.26%) must occur, as written (thousands separators
  aside), in one of the listed files. Derived figures (a ratio worked out by hand) therefore have to be in a results
  file too, written there by the script that measured them.

Paths are relative to the repository root. Usage: python tools/sync_results.py [--check] [FILE.md ...]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"<!-- (results|numbers): (.+?) -->\n(.*?)<!-- /\1 -->", re.S)
# A number as people write it: digits with thousands separators, optional decimals, maybe followed by "x" or "%";
# not part of a word or name (W4A8, sm_90, ResNet-18, 8x8, 1e-4). Signs are ignored: only magnitudes are compared.
NUMBER = re.compile(r"(?<![\w.])(?<!\w[-\u2212])[-\u2212+]?(\d[\d,]*(?:\.\d+)?)(?=x\b|[^\w]|$)")


@dataclass
class Problem:
    doc: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.doc}: block from {self.source}: {self.message}"


def markdown_files() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    names = [os.path.join(docs, n) for n in sorted(os.listdir(docs)) if n.endswith(".md")]
    return [os.path.join(ROOT, "README.md"), *names]


def _read(rel: str) -> str:
    path = os.path.join(ROOT, rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{rel} (named in a results block) does not exist")
    with open(path, encoding="utf-8") as f:
        return f.read()


def source_table(spec: str) -> tuple[str, str]:
    """(results file, its table as text with a final newline) for a block's ``path [heading]`` spec."""
    path, _, heading = spec.strip().partition(" ")
    lines = _read(path).splitlines()
    start = 0
    if heading:
        matches = [i for i, line in enumerate(lines) if line.strip() == heading.strip()]
        if len(matches) != 1:
            raise ValueError(f"{path} has {len(matches)} lines '{heading}', need exactly one")
        start = matches[0] + 1
    first = next((i for i in range(start, len(lines)) if lines[i].startswith("|")), None)
    if first is None:
        raise ValueError(f"{path} has no table after '{heading or 'the start'}'")
    end = first
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return path, "\n".join(lines[first:end]) + "\n"


def numbers_in(text: str) -> list[str]:
    return [m.rstrip(",").replace(",", "") for m in NUMBER.findall(text)]


def check_numbers(spec: str, body: str) -> list[str]:
    """The numbers of ``body`` whose value none of the files in ``spec`` contains (32 matches 32.00, not 32.4)."""
    known = {float(n) for path in spec.split() for n in numbers_in(_read(path))}
    return [n for n in numbers_in(body) if float(n) not in known]


def sync_text(text: str, doc: str, check: bool) -> tuple[str, list[Problem]]:
    problems: list[Problem] = []

    def replace(match: re.Match) -> str:
        kind, spec, body = match.group(1), match.group(2), match.group(3)
        try:
            if kind == "numbers":
                missing = check_numbers(spec, body)
                if missing:
                    problems.append(Problem(doc, spec, f"numbers in no listed file: {', '.join(missing)}"))
                return match.group(0)
            source, table = source_table(spec)
        except (OSError, ValueError) as error:
            problems.append(Problem(doc, spec, str(error)))
            return match.group(0)
        if body != table:
            problems.append(Problem(doc, source, "table differs from the results file (run tools/sync_results.py)"))
        return match.group(0) if check else f"<!-- results: {spec} -->\n{table}<!-- /results -->"

    return BLOCK.sub(replace, text), problems


def sync_file(path: str, check: bool) -> list[Problem]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new, problems = sync_text(text, os.path.relpath(path, ROOT), check)
    if not check and new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"updated {os.path.relpath(path, ROOT)}", file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale blocks, change nothing")
    parser.add_argument("files", nargs="*", help="Markdown files (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    problems = [p for path in (args.files or markdown_files()) for p in sync_file(path, args.check)]
    if not args.check:  # after a rewrite only the number blocks and missing sources can still be wrong
        problems = [p for p in problems if "differs" not in p.message]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
