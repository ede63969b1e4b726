"""Sharing a trained prompt, as PEFT's ``save_pretrained`` / ``from_pretrained``: a run becomes a self-contained folder
in the Hugging Face Hub layout, and every command that takes a run directory also takes that folder or
``hf-hub:ORG/NAME``.

An **exported folder** (``vlprompt export RUN_DIR OUT_DIR``, :func:`export_run`, :func:`save_pretrained`) holds

* ``config.yaml``: the run's resolved config (every value explicit; nothing machine-specific that loading needs:
  no reference checkpoint, no resume, no tracking);
* ``trainable.safetensors``: the trained tensors only, under the method's own names (the frozen backbone is not
  included: the card names the backbone and pretrained tag it needs);
* ``metrics.json``: the run's final metrics (so ``vlprompt report`` reads the folder like a run);
* ``README.md``: the model card, YAML front matter as the Hub expects (``library_name: vlprompt``, ``license``,
  ``tags``), then the method, backbone, data, metrics, trainable parameters, the command that reproduces it and the
  licence of the method's reference code.

:func:`resolve_trained` turns a run directory, an exported folder or ``hf-hub:ORG/NAME`` (downloaded once through
``huggingface_hub.snapshot_download`` into the Hugging Face cache; ``HF_HUB_OFFLINE=1`` uses the cache alone) into
a :class:`TrainedModel`; :func:`load_trained` builds the method from it, :func:`from_pretrained` in one call.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlprompt.config import Config, load_config, to_yaml
from vlprompt.core.checkpoint import load_trainable
from vlprompt.core.factory import build_model, resolve_device, seed_everything
from vlprompt.errors import ConfigError, WeightsUnavailableError
from vlprompt.methods import Method
from vlprompt.run_layout import WEIGHTS, latest_checkpoint

CONFIG, METRICS, CARD = "config.yaml", "metrics.json", "README.md"
HUB_PREFIX = "hf-hub:"
#: What a Hub repository's download fetches: an export's files, and open_clip's config to recognise a backbone.
HUB_FILES = (CONFIG, WEIGHTS, METRICS, CARD, "open_clip_config.json")
#: Annotation formats of video-text data (the card's task tag).
VIDEO_FORMATS = ("msrvtt", "vatex", "lsmdc", "activitynet", "msvd", "didemo")

#: The reference code each method follows and its licence as recorded in vlprompt's specs (``specs/ecosystem.md``,
#: the seeds' READMEs). Our re-implementation is MIT; a model card repeats the reference's terms for whoever compares
#: with, or reuses, the original code and checkpoints.
REFERENCE_CODE = {
    "dgl": "knightyxp/DGL, licensed CC BY-NC 4.0: non-commercial use only",
    "lpi": "Kelvin-ywc/LPI; MIT only for its retrieval/ code (which derives from S-Prompts)",
    "sprompts": "S-Prompts as adapted in Kelvin-ywc/LPI's retrieval/ code (MIT)",
    "seqft": "the sequential fine-tuning baseline of Kelvin-ywc/LPI's retrieval/ code (MIT)",
    "rlcf": "mzhaoshuai/RLCF, licensed Apache-2.0",
    "rlcf_retrieval": "mzhaoshuai/RLCF, licensed Apache-2.0",
    "tpt": "azshue/TPT, licensed MIT",
    "coop": "KaiyangZhou/CoOp (on Dassl.pytorch), licensed MIT",
    "maple": "muzairkhattak/multimodal-prompt-learning, licensed MIT",
    "vpt": "the VPT trainer of muzairkhattak/multimodal-prompt-learning, licensed MIT",
    "coda_prompt": "GT-RIPL/CODA-Prompt, licensed MIT",
    "hide_prompt": "thu-ml/HiDe-Prompt, licensed MIT",
    "itprompt": "jiaolifengmi/IT-Prompt (no code released); its parts follow thu-ml/HiDe-Prompt, licensed MIT",
    "rvlr": "njustkmg/TIP24-Rebalanced_Vision_Language_Retrieval (no licence recorded: ask the authors before reuse)",
    "finetune": "mlfoundations/open_clip, licensed MIT",
    "zeroshot": "mlfoundations/open_clip, licensed MIT",
}


@dataclass(frozen=True)
class TrainedModel:
    """A trained method on disk: ``config`` (its resolved config) and ``checkpoint`` (the folder holding
    ``trainable.safetensors``: a run's latest checkpoint or an exported folder itself; None = nothing trained)."""

    folder: Path
    config: Path
    checkpoint: Path | None
    kind: str  # "run" | "export"

    @property
    def weights(self) -> Path | None:
        """The trainable tensors' file, if any."""
        return self.checkpoint / WEIGHTS if self.checkpoint is not None else None


def is_export(path: Path) -> bool:
    """Whether ``path`` is an exported folder (a resolved config beside the trained tensors)."""
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def hub_snapshot(hub_id: str) -> Path:
    """The local folder of ``hf-hub:ORG/NAME`` (:data:`HUB_FILES` only), downloaded into the Hugging Face cache or
    found there; a missing repository, no network or ``HF_HUB_OFFLINE`` without a cached copy are clear errors."""
    repo = hub_id.removeprefix(HUB_PREFIX).strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"{hub_id!r}: expected hf-hub:ORG/NAME")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=list(HUB_FILES)))
    except RepositoryNotFoundError as err:
        raise WeightsUnavailableError(
            f"{hub_id}: no such repository on the Hugging Face Hub, or it is private (log in with `hf auth login`)"
        ) from err
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise WeightsUnavailableError(
            f"cannot download {hub_id} ({why}), and the Hugging Face cache holds no copy (offline, or "
            f"HF_HUB_OFFLINE=1?). On a machine with internet run `hf download {repo} --local-dir DIR`, copy DIR here "
            "and pass DIR instead of the hf-hub id"
        ) from err


def resolve_trained(target: str | Path, backbone_ok: bool = False) -> TrainedModel | None:
    """A run directory, an exported folder or ``hf-hub:ORG/NAME`` as a :class:`TrainedModel`; None for anything else
    (a config file, a backbone name), and, when ``backbone_ok``, for a Hub repository that holds an open_clip model
    (``open_clip_config.json``), which the caller then loads as a backbone."""
    text = str(target)
    if text.startswith(HUB_PREFIX):
        folder = hub_snapshot(text)
        if not is_export(folder):
            if backbone_ok and (folder / "open_clip_config.json").is_file():
                return None
            raise ConfigError(
                f"{text} is not a vlprompt export (it lacks {CONFIG} and {WEIGHTS})"
                + ("; an open_clip model on the Hub is a backbone: backbone.name=" + text if not backbone_ok else "")
            )
        return TrainedModel(folder, folder / CONFIG, folder, "export")
    path = Path(text).expanduser()
    if not (path.is_dir() and (path / CONFIG).is_file()):
        return None
    if is_export(path):
        return TrainedModel(path, path / CONFIG, path, "export")
    return TrainedModel(path, path / CONFIG, latest_checkpoint(path), "run")


def load_weights(trained: TrainedModel, method: Method) -> None:
    """Load ``trained``'s tensors into ``method``; a method with trainable tensors and no checkpoint is an error."""
    if trained.weights is None:
        if method.trainable_parameters():
            raise ConfigError(f"{trained.folder} has no checkpoint (did its training finish?)")
        return
    load_trainable(trained.weights, method)


def load_trained(
    trained: TrainedModel, overrides: Sequence[str] = (), device: str | None = None
) -> tuple[Method, Config]:
    """The method (in eval mode, its trained tensors loaded) and the config of ``trained``; ``device`` overrides the
    config's."""
    cfg = load_config(trained.config, list(overrides) or None)
    seed_everything(cfg.seed)  # methods with randomly initialised untrained parts must come out the same
    method = build_model(cfg, resolve_device(device or cfg.device))
    load_weights(trained, method)
    return method.eval(), cfg


def from_pretrained(source: str | Path, overrides: Sequence[str] = (), device: str | None = None) -> Method:
    """A method ready to encode (``method.encode_image`` / ``encode_text``) from an exported folder, a run directory
    or ``hf-hub:ORG/NAME``; ``overrides`` are ``key=value`` config overrides."""
    trained = resolve_trained(source)
    if trained is None:
        raise ConfigError(f"{source}: expected an exported folder, a run directory or hf-hub:ORG/NAME")
    return load_trained(trained, overrides, device)[0]


# ---- writing ---------------------------------------------------------------------------------------------------
def shareable_config(cfg: Config) -> Config:
    """A copy of ``cfg`` without what only made sense on the machine that trained it: the reference checkpoint it
    started from (the trained tensors supersede it), where its runs went, ``resume``, the device, the tracking
    backends."""
    out = copy.deepcopy(cfg)
    out.resume, out.device, out.log.report_to, out.out_dir = False, "auto", [], Config().out_dir
    if out.method.get("reference_checkpoint"):
        out.method = {**out.method, "reference_checkpoint": ""}
    return out


def save_pretrained(
    method: Method,
    cfg: Config,
    out_dir: str | Path,
    metrics: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
    license: str = "unknown",
    overwrite: bool = False,
) -> Path:
    """Write ``method``'s trained tensors with ``cfg`` as an exported folder (see the module docstring)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in method.trainable_state_dict().items()}
    return write_export(Path(out_dir), cfg, tensors, metrics or {}, env or {}, license, overwrite)


def export_run(run_dir: str | Path, out_dir: str | Path, license: str = "unknown", overwrite: bool = False) -> Path:
    """``vlprompt export``: a finished training run's config, trained tensors and metrics as an exported folder."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG})")
    if is_export(run_dir):
        raise ConfigError(f"{run_dir} is already an exported folder; copy it instead")
    if (run_dir / "continual.json").is_file():
        raise ConfigError(
            f"{run_dir} is a continual run: export shares the prompt of a `vlprompt train` run (a continual run's "
            "state holds every task's prompts and routing keys)"
        )
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(
            f"{run_dir} has no checkpoint: nothing was trained (a zero-shot, evaluation or test-time adaptation run "
            "keeps no weights; share its config instead)"
        )
    if not (run_dir / METRICS).is_file():
        raise ConfigError(f"{run_dir} did not finish (no {METRICS}); finish it with resume=true, then export")
    cfg = load_config(run_dir / CONFIG)
    metrics = json.loads((run_dir / METRICS).read_text())
    env_file = run_dir / "env.json"
    env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    with safe_open(str(checkpoint / WEIGHTS), framework="pt") as f:  # tensors only, never code
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return write_export(Path(out_dir).expanduser(), cfg, tensors, metrics, env, license, overwrite)


def write_export(
    out: Path,
    cfg: Config,
    tensors: dict[str, Tensor],
    metrics: dict[str, Any],
    env: dict[str, Any],
    license: str,
    overwrite: bool,
) -> Path:
    """Write the folder atomically (a sibling temp folder renamed into place); an existing folder is replaced only
    with ``overwrite`` and only when it is an export itself."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace an earlier export")
        if not is_export(out):
            raise ConfigError(f"{out} is not an exported folder; refusing to replace it (choose a new folder)")
    shared = shareable_config(cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(to_yaml(shared))
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (tmp / CARD).write_text(model_card(shared, tensors, metrics, env, license, out.name))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ---- the model card --------------------------------------------------------------------------------------------
def _method_name(cfg: Config) -> str:
    return str(cfg.method.get("name", "?"))


def _method_summary(name: str) -> str:
    """The first line of the method module's docstring (``"CoOp (Zhou et al., IJCV 2022): learned text ..."``)."""
    from vlprompt.methods.base import METHODS

    if name not in METHODS:
        return name
    doc = inspect.getmodule(METHODS.get(name)).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else name


def _base_model(cfg: Config) -> str | None:
    """The Hub repository of the backbone's weights, when open_clip names one (the card's ``base_model``)."""
    name, tag = cfg.backbone.name, cfg.backbone.pretrained
    if name.startswith(HUB_PREFIX):
        return name.removeprefix(HUB_PREFIX)
    if not tag:
        return None
    import open_clip

    try:
        hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "")
    except Exception:  # an unknown name or tag (a local file, the embedded world): no Hub repository
        return None
    return hub.strip("/") or None


def _metric_order(key: str) -> tuple:
    """``i2t/R@1, i2t/R@5, i2t/R@10, i2t/MdR, ..., t2i/..., rsum``: as people read them, per direction with recalls by
    K first, then what belongs to no direction."""
    head, _, k = key.partition("@")
    return ("/" not in key, key.split("/")[0], not k.isdigit(), int(k) if k.isdigit() else 0, head)


def _metrics_table(metrics: dict[str, Any]) -> str:
    splits = [s for s in ("test", "val") if isinstance(metrics.get(s), dict)]
    if not splits:
        return "No final metrics were recorded.\n"
    keys = sorted({k for s in splits for k in metrics[s]}, key=_metric_order)
    cell = lambda v: f"{v:.2f}" if isinstance(v, int | float) and math.isfinite(v) else "-"  # noqa: E731
    lines = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    lines += [f"| {k} | " + " | ".join(cell(metrics[s].get(k)) for s in splits) + " |" for k in keys]
    return "\n".join(lines) + "\n"


def _command(env: dict[str, Any]) -> str | None:
    argv = [str(a) for a in env.get("argv") or []]
    if not argv:
        return None
    program = Path(argv[0]).name
    head = ["vlprompt"] if program == "vlprompt" else ["python -m vlprompt"] if program == "__main__.py" else [argv[0]]
    return " ".join(head + [shlex.quote(a) for a in argv[1:]])


def model_card(
    cfg: Config, tensors: dict[str, Tensor], metrics: dict[str, Any], env: dict[str, Any], license: str, title: str
) -> str:
    """``README.md`` of an exported folder: YAML front matter for the Hub, then what a user needs to use the prompt
    and judge it."""
    name, b, d = _method_name(cfg), cfg.backbone, cfg.data
    video = d.format in VIDEO_FORMATS
    front: dict[str, Any] = {
        "library_name": "vlprompt",
        "license": license,
        "tags": [
            "vlprompt",
            "clip",
            "open_clip",
            "prompt-learning",
            name,
            "video-text-retrieval" if video else "image-text-retrieval",
        ],  # fmt: skip
    }
    if base := _base_model(cfg):
        front["base_model"] = base
    count = sum(t.numel() for t in tensors.values())
    shown = sorted(tensors)[:20]
    params = "\n".join(f"| `{k}` | {list(tensors[k].shape)} | {tensors[k].numel():,} |" for k in shown)
    more = f"\n\n... and {len(tensors) - len(shown)} more tensors." if len(tensors) > len(shown) else ""
    local = b.pretrained and (Path(b.pretrained).expanduser().is_absolute() or Path(b.pretrained).exists())
    weights_note = (
        f"\n\n**Note:** the backbone's weights are a local path on the machine that trained this prompt "
        f"(`{b.pretrained}`); whoever loads this folder needs that file too, or `backbone.pretrained=...` pointing "
        "to their copy."
        if local
        else ""
    )
    original = _command(env)
    provenance = ", ".join(f"{k} {env[k]}" for k in ("vlprompt", "git_sha", "torch", "open_clip") if env.get(k))
    reference = REFERENCE_CODE.get(name, "no reference code recorded for this method")
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
        f"# {title}: {name} on {b.name}\n",
        f"A trained **{name}** prompt for the CLIP backbone **{b.name}** (pretrained: `{b.pretrained}`), made with "
        "vlprompt and shared with `vlprompt export`. This folder holds the trained tensors "
        f"only ({count:,} numbers); the backbone is loaded from open_clip.\n",
        "## Method\n",
        f"{_method_summary(name)}\n\nOptions: `{json.dumps(dict(cfg.method), sort_keys=True)}`\n",
        "## Backbone\n",
        f"- open_clip architecture: `{b.name}`\n- pretrained tag: `{b.pretrained}`\n"
        f"- precision: `{b.precision}`{weights_note}\n",
        "## Data\n",
        f"- format: `{d.format}`, root: `{d.root}`\n- train: `{d.train}`, val: `{d.val or '-'}`, "
        f"test: `{d.test or '-'}`\n- captions: "
        + (f"cut to {d.max_words} tokens\n" if d.max_words else "the model's whole context\n"),
        "## Metrics\n",
        "Recall@K in percent (R@K: share of queries whose match is among the top K; i2t = image to text, t2i = "
        "text to image), MdR / MnR: median / mean rank of the first match.\n\n" + _metrics_table(metrics),
        "## Trainable parameters\n",
        f"{count:,} trained numbers in {len(tensors)} tensor{'s' * (len(tensors) != 1)} (`trainable.safetensors`):\n\n"
        f"| tensor | shape | numbers |\n|---|---|---:|\n{params}{more}\n",
        "## Use\n",
        "```bash\npip install vlprompt\n"
        "vlprompt eval hf-hub:ORG/NAME data.root=/your/data data.test=test.json   # or this folder's path\n"
        "vlprompt index build --model hf-hub:ORG/NAME --data /your/images --out index/\n```\n\n"
        "```python\nimport vlprompt\n\n"
        'method = vlprompt.from_pretrained("hf-hub:ORG/NAME")  # or this folder\'s path\n'
        "image_features = method.encode_image(images)  # [B, 3, H, W], the backbone's preprocessing\n"
        'text_features = method.encode_text(["a red star"])\n```\n',
        "## Reproduce\n",
        "`config.yaml` is the run's resolved config (every value explicit). With the data at hand:\n\n"
        "```bash\nvlprompt train config.yaml data.root=/path/to/the/data\n```\n"
        + (
            f"\nThe original command was `{original}`" + (f" ({provenance})" if provenance else "") + ".\n"
            if original
            else ""
        ),  # fmt: skip
        "## Licence\n",
        f"This export is released under `{license}`. The method's reference code: {reference}. vlprompt's "
        "re-implementation is MIT-licensed; the backbone's weights carry their own licence (see open_clip's model "
        "list).\n",
    ]
    return "\n".join(sections)
