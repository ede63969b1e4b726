"""Kill rates per module from mutmut's result files: ``python tools/mutation_summary.py [mutants/src] [prefix] [-v]``.

Killed counts timeouts and segfaults too; ``not checked`` mutants (run interrupted) are left out of the rate.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code


def main(argv: list[str]) -> None:
    args = [a for a in argv if a != "-v"]
    root = Path(args[0] if args else "mutants/src")
    prefix = args[1] if len(args) > 1 else ""
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    alive = []
    for meta in sorted(root.rglob("*.py.meta")):
        module = str(meta.relative_to(root))[: -len(".py.meta")].replace("/", ".")
        if not module.startswith(prefix):
            continue
        for key, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            status = status_by_exit_code[code]
            by_module[module][status] += 1
            if status in ("survived", "no tests"):
                alive.append((status, key))
    total: collections.Counter = collections.Counter()
    for module, counts in [*sorted(by_module.items()), ("TOTAL", total)]:
        if module != "TOTAL":
            total.update(counts)
        killed = counts["killed"] + counts["timeout"] + counts["segfault"]
        tested = sum(v for s, v in counts.items() if s != "not checked")
        print(f"{module:45s} {dict(counts)}  kill={killed}/{tested} {100 * killed / max(tested, 1):.1f}%")
    if "-v" in argv:
        for status, key in alive:
            print(status, key)


if __name__ == "__main__":
    main(sys.argv[1:])
