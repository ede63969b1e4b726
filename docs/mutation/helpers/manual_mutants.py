"""Hand-made mutants on a scratch copy of the frozen src: python manual_mutants.py SPEC.json
SPEC: [{"file": "methods/lpi.py", "old": "...", "new": "...", "tests": ["tests/methods/x.py"], "name": "..."}]
Each mutant: copy /tmp/mutwork/src -> /tmp/mutwork/scratch/src, replace `old` (must occur once) by `new`,
run pytest -x on its tests with PYTHONPATH=scratch/src from /work/main ($SCRATCH overrides the scratch folder). Prints killed/survived per mutant."""
import json, os, shutil, subprocess, sys
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
scratch = Path(os.environ.get("SCRATCH", "/tmp/mutwork/scratch"))  # one per concurrent user
for m in spec:
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree("/tmp/mutwork/src", scratch / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (scratch / "configs").symlink_to("/tmp/mutwork/configs")  # runner tests find recipes beside src/
    f = scratch / "src/vlprompt" / m["file"]
    text = f.read_text()
    assert text.count(m["old"]) == 1, (m["name"], text.count(m["old"]))
    f.write_text(text.replace(m["old"], m["new"]))
    env = dict(os.environ, PYTHONPATH=str(scratch / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run(["/work/main/.venv/bin/python", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m["tests"]],
                       cwd="/work/main", env=env, capture_output=True, text=True)
    print(("killed  " if r.returncode else "SURVIVED"), m["name"], flush=True)
