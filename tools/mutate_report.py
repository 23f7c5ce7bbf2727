"""The end of `make mutate`: per-file numbers of the last mutmut run and its surviving mutants.

    python tools/mutate_report.py [FILE.py ...]      (default: every file [tool.mutmut] mutates)

Reads mutmut's results under mutants/ (run from the repository root, after `mutmut run`).
Prints, for each file, how many mutants there are and how many were killed, survived, timed
out (killed by the CPU-time limit: the mutant hangs or slows down a lot) or had no test to
run; then each survivor with its diff, marked `documented` when docs/testing.md names it
(the mutant is equivalent, see there) and `NEW` otherwise. A mutant whose function no
selected test calls ("no tests") counts as a survivor. Exits 1 when a survivor is not
documented, 2 when some mutants of the files have not been run.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

DOC = Path("docs/testing.md")
COLUMNS = ("mutants", "killed", "survived", "timeout", "no tests", "not run", "other")


def changed_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def is_documented(name: str, documented: str) -> bool:
    """Whether the page names this mutant, by its full or its short name (`module.x_fn__mutmut_N`),
    as a whole name: `..._mutmut_1` is not documented by `..._mutmut_12`."""
    short = name.split(".", name.count(".") - 1)[-1] if "." in name else name
    return any(re.search(r"(?<!\w)" + re.escape(n) + r"(?!\d)", documented) for n in (name, short))


def main(argv: list[str]) -> int:
    files = argv or [p for p in config().only_mutate]
    documented = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    rows, survivors, missing = [], [], []
    for path in files:
        data = SourceFileMutationData(path=path)
        data.load()
        if not data.exit_code_by_key:
            missing.append(path)
            continue
        counts = Counter()
        for name, code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[code]
            counts["mutants"] += 1
            if status in ("killed", "timeout", "survived", "no tests"):
                counts[status] += 1
            elif status == "not checked":
                counts["not run"] += 1
            else:
                counts["other"] += 1      # suspicious, segfault, ...: listed with the survivors
            if status not in ("killed", "timeout", "not checked"):
                survivors.append((path, name, status))
        rows.append((path, counts))

    width = max([len(p) for p, _ in rows] + [4])
    print(f"\n{'file':<{width}}  " + "  ".join(f"{c:>8}" for c in COLUMNS))
    for path, counts in rows:
        print(f"{path:<{width}}  " + "  ".join(f"{counts[c]:>8}" for c in COLUMNS))

    undocumented = 0
    if survivors:
        print(f"\n{len(survivors)} surviving mutants (docs/testing.md says why each documented one is "
              "equivalent):")
    for path, name, status in survivors:
        known = is_documented(name, documented)
        undocumented += not known
        tag = "documented" if known else "NEW"
        print(f"\n  [{tag}] {name} ({status})")
        try:
            diff = get_diff_for_mutant(name, path=path)
        except Exception as e:  # noqa: BLE001 - the listing goes on without this diff
            print(f"      (no diff: {e})")
            continue
        for line in changed_lines(diff):
            print("      " + line)
    for path in missing + [p for p, counts in rows if counts["not run"]]:
        print(f"\n{path}: mutants not run yet (run `make mutate FILES={path}`)")
    missing += [p for p, counts in rows if counts["not run"]]
    if undocumented:
        print(f"\n{undocumented} survivor(s) neither killed by a test nor documented in {DOC}")
        return 1
    return 2 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
