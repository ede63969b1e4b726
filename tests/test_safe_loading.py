"""No file that vlprompt reads can run code: every reader of a pickled format refuses a planted payload, and a
source rule keeps unsafe loading calls out of src/ and benchmarks/."""

from __future__ import annotations

import ast
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlprompt.errors import VlpromptError

ROOT = Path(__file__).resolve().parents[1]


class Planted:
    """Unpickling this touches ``marker``: a stand-in for any code a copied file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _live(payload: bytes, marker: Path, load: Callable[[bytes], object] = pickle.loads) -> bytes:
    """Check that an unrestricted load of ``payload`` really runs it (so a refusal below means something)."""
    load(payload)
    assert marker.exists(), "the planted payload did not run under an unrestricted load"
    marker.unlink()
    return payload


def _planted_pickle(marker: Path, wrap: Callable[[Planted], object] = lambda p: p) -> bytes:
    return _live(pickle.dumps(wrap(Planted(marker)), protocol=2), marker)


def _planted_torch(path: Path, marker: Path, wrap: Callable[[Planted], object]) -> None:
    torch.save(wrap(Planted(marker)), path)
    _live(path.read_bytes(), marker, lambda _: torch.load(path, weights_only=False))  # the unsafe load, once


# ---- one planted file per reader ---------------------------------------------------------------------------------
def _cifar(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    from vlprompt.data.cil import read_cifar100

    folder = tmp / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(_planted_pickle(marker, lambda p: {b"data": p, b"fine_labels": [0]}))
    return folder / "train", lambda: read_cifar100(tmp, "train")


def _cifar_meta(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    import numpy as np

    from vlprompt.data.cil import read_cifar100

    folder = tmp / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}))
    (folder / "meta").write_bytes(_planted_pickle(marker, lambda p: {b"fine_label_names": [p]}))
    return folder / "meta", lambda: read_cifar100(tmp, "test")


def _captions(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    from vlprompt.data.video_datasets import read_msvd

    (tmp / "raw-captions.pkl").write_bytes(_planted_pickle(marker, lambda p: {"vid1": [["a", "dog"]], "x": p}))
    (tmp / "test_list.txt").write_text("vid1\n")
    return tmp / "raw-captions.pkl", lambda: read_msvd(tmp, tmp / "videos", "test")


def _refer_refs(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    from vlprompt.data.grounding import read_refer

    folder = tmp / "refcoco"
    folder.mkdir()
    (folder / "refs(unc).p").write_bytes(_planted_pickle(marker, lambda p: [{"ref_id": 1, "sentences": p}]))
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return folder / "refs(unc).p", lambda: read_refer(folder, "val")


def _reference(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    from vlprompt.core.checkpoint import load_reference_checkpoint

    path = tmp / "official.pth"
    _planted_torch(path, marker, lambda p: {"state_dict": {"w": torch.zeros(2)}, "epoch": p})
    return path, lambda: load_reference_checkpoint(path, torch.nn.Linear(2, 2))


def _coop_context(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    from vlprompt.methods.tpt import load_context

    path = tmp / "coop.pth"
    _planted_torch(path, marker, lambda p: {"state_dict": {"ctx": torch.zeros(4, 8)}, "optimizer": p})
    return path, lambda: load_context(str(path))


def _backbone_file(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    # backbone.pretrained=/path/file.pt: open_clip's loader, which must load with weights_only=True
    from vlprompt.backbone.loading import create_clip

    path = tmp / "clip.pt"
    _planted_torch(path, marker, lambda p: {"state_dict": {"logit_scale": torch.ones(())}, "args": p})
    return path, lambda: create_clip("vlprompt-tiny", str(path))


def _legacy_run(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    # A run directory of an older vlprompt (pickled state.pt) copied in, and resumed: the trainer's reader.
    from vlprompt.core.checkpoint import load_checkpoint

    step = tmp / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    module = torch.nn.Linear(2, 2)
    module.trainable_state_dict = module.state_dict  # the method interface load_trainable uses
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(step / "trainable.safetensors"))
    _planted_torch(step / "state.pt", marker, lambda p: {"step": 4, "optimizer": p})
    return step / "state.pt", lambda: load_checkpoint(step, module)


def _legacy_continual(tmp: Path, marker: Path) -> tuple[Path, Callable[[], object]]:
    # The continual runner's between-task loop state of an older vlprompt (loop.pt), resumed.
    from vlprompt.runners.continual import run_task_sequence

    run = tmp / "run"
    task = run / "checkpoints" / "task_000"
    task.mkdir(parents=True)
    save_file({"counter": torch.zeros(())}, str(task / "state.safetensors"))
    _planted_torch(task / "loop.pt", marker, lambda p: {"session": 0, "rng": p})
    (run / "checkpoints" / "latest").write_text("task_000\n")
    (run / "continual.json").write_text(json.dumps({"sessions": [{"per_task": [{"acc": 1.0}]}]}))

    class Learner:
        def load_state_dict(self, state: dict, session: int) -> None:
            raise AssertionError("the learner must not be loaded from a refused checkpoint")

    return task / "loop.pt", lambda: run_task_sequence(Learner(), [{"name": "a"}, {"name": "b"}], run, resume=True)


READERS = {
    "cifar100 batch": _cifar,
    "cifar100 meta": _cifar_meta,
    "caption pickle": _captions,
    "refer refs pickle": _refer_refs,
    "reference checkpoint": _reference,
    "coop context": _coop_context,
    "backbone checkpoint": _backbone_file,
    "trainer loop state": _legacy_run,
    "continual loop state": _legacy_continual,
}


@pytest.mark.parametrize("reader", list(READERS))
def test_a_planted_file_is_refused_and_never_runs(reader: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    planted, read = READERS[reader](tmp_path, marker)
    with pytest.raises(VlpromptError) as err:
        read()
    assert str(planted) in str(err.value)  # the message names the file
    assert "weights_only=False" not in str(err.value)  # torch's advice to load unsafely is not passed on
    assert not marker.exists()


# ---- the source rule ---------------------------------------------------------------------------------------------
SAFE_PICKLE = ROOT / "src" / "vlprompt" / "safe_pickle.py"


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loading(source: str, pickle_allowed: bool = False) -> list[str]:
    """Lines of ``source`` that could run code while reading a file (see the module docstring)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if not pickle_allowed:
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("pickle", "dill") for a in node.names):
                found.append(f"{where}: imports pickle (use vlprompt.safe_pickle)")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "dill"):
                found.append(f"{where}: imports from pickle (use vlprompt.safe_pickle)")
            if isinstance(node, ast.Attribute) and _dotted(node).endswith(("pickle.load", "pickle.loads",
                                                                          "pickle.Unpickler")):  # fmt: skip
                found.append(f"{where}: {_dotted(node)} (use vlprompt.safe_pickle.load_pickle)")
        if isinstance(node, ast.keyword) and node.arg == "weights_only" and not _is_const(node.value, True):
            found.append(f"{where}: weights_only must be True")
        if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not _is_const(node.value, False):
            found.append(f"{where}: allow_pickle must be False")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True")
        if name.endswith(("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all")):
            found.append(f"{where}: {name}")
        if name.endswith(("yaml.load", "yaml.load_all")):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or not _dotted(loader).endswith("SafeLoader"):
                found.append(f"{where}: {name} without a SafeLoader")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch\ntorch.load(\n    p,\n    map_location='cpu',\n)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import pickle\n",
        "from pickle import loads\n",
        "import x\nx.pickle.load(f)",
        "import yaml\nyaml.load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(s)",
    ],
)
def test_the_rule_catches_each_unsafe_form(snippet: str) -> None:
    assert unsafe_loading(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)",
        "from vlprompt.safe_pickle import load_pickle\nload_pickle(p)",
    ],
)
def test_the_rule_passes_safe_forms(snippet: str) -> None:
    assert unsafe_loading(snippet) == []


def test_no_unsafe_loading_in_src_or_benchmarks() -> None:
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert SAFE_PICKLE in files
    problems = [f"{f.relative_to(ROOT)} {p}" for f in files
                for p in unsafe_loading(f.read_text(), pickle_allowed=f == SAFE_PICKLE)]  # fmt: skip
    assert problems == []
