"""Survivor list in docs/mutation's format: python survivors_md.py RUN_DIR PREFIX CLASSIFICATION.tsv [killed_note]

CLASSIFICATION.tsv: ``mutant<TAB>EQUIVALENT: reason`` or ``mutant<TAB>NOT KILLED: reason``. Survivors of the run
without a line are reported as ``UNCLASSIFIED``. Diff lines come from ``mutmut show`` in RUN_DIR.
"""
import collections, json, subprocess, sys
from pathlib import Path
sys.path.insert(0, "/work/main/.venv/lib/python3.11/site-packages")
from mutmut.stats import status_by_exit_code

run, prefix, tsv = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cls = {}
for line in tsv.read_text().splitlines():
    if line.strip() and not line.startswith("#"):
        k, v = line.split("\t", 1)
        cls[k.strip()] = v.strip()
alive = []
for meta in sorted((run / "mutants/src").rglob("*.py.meta")):
    for key, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
        if key.startswith(prefix) and status_by_exit_code[code] in ("survived", "no tests"):
            alive.append(key)
groups = collections.defaultdict(list)
for key in alive:
    out = subprocess.run(["/work/main/.venv/bin/mutmut", "show", key], cwd=run, capture_output=True, text=True).stdout
    plus = [l[1:].strip() for l in out.splitlines() if l.startswith("+") and not l.startswith("+++")]
    groups[cls.get(key, "UNCLASSIFIED: ")].append((key.removeprefix("vlprompt."), " / ".join(plus)))
eq = sum(len(v) for k, v in groups.items() if k.startswith("EQUIVALENT"))
by_hand = sum(len(v) for k, v in groups.items() if k.startswith("KILLED BY HAND"))
line = f"survivors {len(alive)}, equivalent {eq}, non-equivalent {len(alive) - eq}"
if by_hand:
    line += f" ({by_hand} killed by tests added after the run, checked on hand-made mutants; {len(alive) - eq - by_hand} not killed)"
print(line + "\n")
for reason in sorted(groups):
    kind, _, why = reason.partition(":")
    print(f"### {kind}: {why.strip()} ({len(groups[reason])})")
    for key, line in sorted(groups[reason]):
        print(f"- {key}: `{line}`")
    print()
