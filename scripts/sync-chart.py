#!/usr/bin/env python3
"""Copy the generated CRDs and the operator's RBAC rules into the Helm chart.

Helm can only read files inside the chart, so the chart keeps byte-for-byte copies:

    crds/*.yaml                          -> helm/fedkube/files/crds/
    operator/rbac/operator-role.yaml     -> helm/fedkube/files/rbac/

templates/crds.yaml renders the CRDs; templates/rbac.yaml takes the operator's rules.
(operator/rbac/coordinator-role.yaml is not copied: the operator itself creates that Role
for each job, so the chart only needs the operator to hold its rights.)

    python scripts/sync-chart.py          # copy, and delete copies whose source is gone
    python scripts/sync-chart.py --check  # change nothing; exit 1 listing what differs

Run it after `fedkube crds` or an edit of operator/rbac/; tests/deploy/test_chart.py runs
the check. Standard library only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_FILES = REPO_ROOT / "helm" / "fedkube" / "files"
# (source folder, copy in the chart, which of the source's files); copies of files that
# do not match the pattern are stale.
PAIRS = (
    (REPO_ROOT / "crds", CHART_FILES / "crds", "*.yaml"),
    (REPO_ROOT / "operator" / "rbac", CHART_FILES / "rbac", "operator-role.yaml"),
)
Pairs = tuple[tuple[Path, Path, str], ...]


@dataclass(frozen=True)
class Difference:
    """One way a chart copy differs from its source."""

    kind: str  # "missing source", "missing", "changed" or "stale"
    source: Path
    copy: Path

    def __str__(self) -> str:
        rel = _relative
        if self.kind == "missing source":
            return f"{rel(self.source)} has nothing to copy into {rel(self.copy)}/"
        if self.kind == "stale":
            return f"{rel(self.copy)} has no source {rel(self.source)} any more"
        return f"{rel(self.copy)} is {self.kind} (source {rel(self.source)})"


def _relative(path: Path) -> Path:
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def differences(pairs: Pairs = PAIRS) -> list[Difference]:
    """Everything that keeps the chart's copies from equalling their sources."""
    found: list[Difference] = []
    for source_dir, copy_dir, pattern in pairs:
        sources = {p.name: p for p in sorted(source_dir.glob(pattern))}
        copies = {p.name: p for p in sorted(copy_dir.glob("*.yaml"))}
        if not sources:
            found.append(Difference("missing source", source_dir / pattern, copy_dir))
            continue
        for name, source in sources.items():
            copy = copy_dir / name
            if name not in copies:
                found.append(Difference("missing", source, copy))
            elif copy.read_bytes() != source.read_bytes():
                found.append(Difference("changed", source, copy))
        for name, copy in copies.items():
            if name not in sources:
                found.append(Difference("stale", source_dir / name, copy))
    return found


def sync(pairs: Pairs = PAIRS) -> list[Difference]:
    """Bring the copies in line with their sources; returns what could not be fixed
    (a source with nothing to copy: the chart's copies are then left alone)."""
    unfixable = []
    for difference in differences(pairs):
        if difference.kind == "missing source":
            unfixable.append(difference)
        elif difference.kind == "stale":
            difference.copy.unlink()
        else:
            difference.copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(difference.source, difference.copy)
    return unfixable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the chart's copies are out of date")
    args = parser.parse_args(argv)
    problems = differences() if args.check else sync()
    for problem in problems:
        print(f"sync-chart: {problem}", file=sys.stderr)
    if problems and args.check:
        print("sync-chart: run `python scripts/sync-chart.py` and commit the result",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
