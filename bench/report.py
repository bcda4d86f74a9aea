"""Every benchmark's tables and plots in one page: bench/results/*.md and *.png → docs/results.md.

Run: ``python -m bench.report [--results bench/results] [--out docs/results.md]``. Each
Markdown file becomes a section (its headings one level down); image links are
rewritten to work from the output's folder; a plot no table links to gets a
section of its own at the end. The benchmarks themselves are not rerun.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Known benchmarks first, in reading order; anything else follows by name.
ORDER = ("overhead", "overhead_a_repeat", "overhead_rerun", "overhead_lean_fp32", "overhead_lean_int8", "overhead_lean_int4", "engine",
         "planner", "adapt_node_slowdown", "adapt_link_degradation", "adapt_link_degradation_int8", "adapt_node_loss",
         "adapt_node_join", "adapt_busy_edge_site")  # fmt: skip
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def ordered(paths: list[Path]) -> list[Path]:
    """Known names in ORDER, then the rest alphabetically."""
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(paths, key=lambda p: (rank.get(p.stem, len(ORDER)), p.stem))


def section(md: str, results: Path, out_dir: Path) -> tuple[str, str, set[str]]:
    """(title, body with headings demoted and image links relative to out_dir, images it links)."""
    lines = md.rstrip().splitlines()
    title = lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else "(untitled)"
    linked: set[str] = set()

    def relink(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target:
            return m.group(0)
        linked.add(Path(target).name)
        return f"![{m.group(1)}]({os.path.relpath(results / target, out_dir)})"

    body = "\n".join(("#" + ln if ln.startswith("#") else ln) for ln in lines)
    return title, IMAGE.sub(relink, body), linked


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")


def build(results: Path, out: Path) -> str:
    """The whole page."""
    sections, linked, seen = [], set(), set()
    for path in ordered(list(results.glob("*.md"))):
        title, body, images = section(path.read_text(encoding="utf-8"), results, out.parent)
        if (
            title in seen
        ):  # e.g. the overhead variants: the file name tells them apart, and keeps anchors unique
            unique = f"{title} ({path.stem})"
            body = body.replace(f"## {title}", f"## {unique}", 1)
            title = unique
        seen.add(title)
        sections.append((title, path.name, body))
        linked |= images
    loose = [p for p in ordered(list(results.glob("*.png"))) if p.name not in linked]
    head = ["# Benchmark results", "",
            "Assembled by `make report` (`bench/report.py`) from `bench/results/`; each section is one "
            "benchmark's own Markdown, unchanged but for heading levels and image paths. The JSON next to "
            "each file holds the raw figures. Rerun a benchmark (`make bench-*`) and then `make report`.", ""]  # fmt: skip
    head += [f"- [{t}](#{anchor(t)}) (`bench/results/{name}`)" for t, name, _ in sections]
    if loose:
        head.append("- [Other plots](#other-plots)")
    parts = ["\n".join(head), *(body for _, _, body in sections)]
    if loose:
        parts.append("## Other plots\n\n" + "\n\n".join(
            f"![{p.stem}]({os.path.relpath(p, out.parent)})" for p in loose))  # fmt: skip
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/results.md (or --out)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = p.parse_args(argv)
    text = build(args.results.resolve(), args.out.resolve())
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({text.count(chr(10))} lines)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
