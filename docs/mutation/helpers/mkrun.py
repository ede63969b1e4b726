"""Make a frozen mutmut work dir /tmp/mutwork/runs/<name> mutating <files> with <tests> selected."""
import re, shutil, sys, os
from pathlib import Path
name, files, tests = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
src = Path("/tmp/mutwork")
dst = src / "runs" / name
if dst.exists():
    shutil.rmtree(dst)
dst.mkdir(parents=True)
for d in ("src", "tests", "configs", "tools"):
    shutil.copytree(src / d, dst / d, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
os.symlink("/work/shared", dst / "shared")
# mutmut maps a function to the tests that ran it; a module-scoped fixture runs only in the module's first test,
# so the golden checks would never be mapped to the code they check: make those fixtures function-scoped here.
for golden in (dst / "tests/methods").glob("test_golden_lpi.py"):  # dgl's module fixture is only the backbone
    golden.write_text(golden.read_text().replace('@pytest.fixture(scope="module")', "@pytest.fixture"))
p = (src / "pyproject.toml").read_text()
p = re.sub(r'only_mutate = \[.*?\]\n', "only_mutate = [" + ", ".join(f'"src/vlprompt/{f}"' for f in files) + "]\n", p, flags=re.S)
p = re.sub(r'pytest_add_cli_args_test_selection = \[.*?\]\n', "pytest_add_cli_args_test_selection = [" + ", ".join(f'"tests/{t}"' for t in tests) + "]\n", p, flags=re.S)
(dst / "pyproject.toml").write_text(p)
if len(sys.argv) > 4 and sys.argv[4] == "undec":
    import glob, subprocess
    targets = sorted({f for pat in files for f in glob.glob(str(dst / "src/vlprompt" / pat))})
    subprocess.run(["/work/main/.venv/bin/python", "/tmp/mutwork/undecorate.py", *targets], check=True,
                   stdout=subprocess.DEVNULL)
print(dst)
