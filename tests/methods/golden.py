"""Golden outputs of the reference code: where the fixtures live and how their seeded configuration is rebuilt.

``benchmarks/dgl_reference.py --record`` and ``benchmarks/lpi_reference.py --record`` ran the reference
implementations (knightyxp/DGL, Kelvin-ywc/LPI) on a small random CLIP and saved their outputs as arrays under
``tests/fixtures/golden/`` (``<name>.npz`` + ``<name>.json`` with the reference commit, the command and the
configuration). The recorders and the golden tests build our side with the functions here, so both see the same
weights and inputs: every weight is a function of (seed, parameter name, shape) only, drawn on the CPU, so it does
not depend on the machine, on open_clip's initialisation order or on the order in which modules are registered.
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import vlprompt
from vlprompt.data.continual import COCO_TASK_POSITIVES, coco_task_sequence, task_relation
from vlprompt.methods import build_method
from vlprompt.methods.base import Method

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


# ---- fixture files ----------------------------------------------------------------------------------------------
def read_fixture(name: str, root: Path = FIXTURES) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` of fixture ``name``: the JSON description and the arrays (never pickles)."""
    meta = json.loads((root / f"{name}.json").read_text())
    with np.load(root / f"{name}.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return meta, arrays


def write_fixture(name: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], root: Path) -> list[Path]:
    """Write ``<name>.npz`` (compressed; numeric arrays only) and ``<name>.json``; returns the two paths."""
    for key, value in arrays.items():
        if value.dtype.kind not in "biuf":
            raise TypeError(f"golden array {key!r} has dtype {value.dtype}; only numeric arrays are stored")
    root.mkdir(parents=True, exist_ok=True)
    npz, js = root / f"{name}.npz", root / f"{name}.json"
    np.savez_compressed(npz, **arrays)
    js.write_text(json.dumps(meta, indent=2) + "\n")
    return [npz, js]


# ---- seeded weights and inputs ----------------------------------------------------------------------------------
def seeded_normal(shape: tuple[int, ...] | torch.Size, seed: int, name: str = "") -> Tensor:
    """Standard normal float32 tensor from a CPU generator seeded by ``seed`` and ``name``."""
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def seeded_init(module: nn.Module, seed: int) -> None:
    """Overwrite every parameter of ``module`` with a draw that depends only on (seed, name, shape).

    LayerNorms get ``1 + 0.1·N`` weights and ``0.1·N`` biases (not the identity, so a skipped or swapped norm
    shows), the logit scale CLIP's ``log(1/0.07)``, class embeddings and matrices ``N/sqrt(fan_in)``, other
    vectors ``0.02·N``.
    """
    norms = {
        f"{prefix}.{p}" if prefix else p
        for prefix, mod in module.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for p, _ in mod.named_parameters(recurse=False)
    }
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = seeded_normal(param.shape, seed, name)
            if name in norms:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * noise
            elif name.endswith("logit_scale"):
                value = torch.full(param.shape, math.log(1 / 0.07))
            elif name.endswith("class_embedding"):
                value = noise * param.shape[-1] ** -0.5
            elif param.dim() <= 1:
                value = 0.02 * noise
            else:
                fan_in = param[0].numel() if param.dim() == 4 else param.shape[-1]  # conv: C·k·k
                value = noise * fan_in**-0.5
            param.copy_(value.to(param))


def build_backbone(model_cfg: Mapping[str, Any]) -> vlprompt.Backbone:
    """A randomly initialised open_clip CLIP of configuration ``model_cfg`` (through ``local-dir:``)."""
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(model_cfg)}))
        return vlprompt.load_backbone(f"local-dir:{root}", pretrained=None).eval()


def build_seeded_method(meta: Mapping[str, Any], options: Mapping[str, Any], backbone: vlprompt.Backbone) -> Method:
    """Method ``options`` on ``backbone`` with every weight (backbone included) from :func:`seeded_init`."""
    method = build_method(dict(options), backbone).eval()
    seeded_init(method, int(meta["seed"]))
    return method


def grad_summary(grads: Mapping[str, Tensor], seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(names, norms, projections)``: each gradient's L2 norm and its projection on a seeded unit direction.

    Two numbers per tensor pin a gradient of millions of entries (``|Δprojection| <= ||Δgrad||``), so a
    gradient that reaches the wrong tensor, or with the wrong scale or direction, fails a golden comparison.
    """
    names = sorted(grads)
    norms, projections = [], []
    for name in names:
        g = grads[name].detach().double().cpu().flatten()
        direction = seeded_normal(g.shape, seed, "grad:" + name).double()
        norms.append(float(g.norm()))
        projections.append(float(g @ (direction / direction.norm())))
    return names, np.array(norms), np.array(projections)


def trainable_grads(named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """Gradients of the trainable parameters after a backward pass; an unused one counts as zeros (the
    reference computes exact zeros where its code path is dead, e.g. DGL's postfix prompts)."""
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in named if p.requires_grad}


def routing_margin(features: Tensor, centres: Tensor) -> float:
    """Smallest gap, over queries ``[N, E]``, between the L1 distance to the nearest and to the second-nearest
    task, each task at the distance of its nearest key in ``centres [T, K, E]`` (S-Prompts' routing rule)."""
    dist = (features[:, None, None, :] - centres[None]).abs().sum(-1).amin(-1).double()  # [N, T]
    two = dist.topk(2, dim=1, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())


def assert_close(ours: Tensor | np.ndarray | float, ref: np.ndarray, atol: float, what: str) -> float:
    """Assert ``max |ours - ref| <= atol`` (same shape); returns the max difference for reports."""
    a = np.asarray(ours.detach().cpu() if isinstance(ours, Tensor) else ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} differs from the reference's {b.shape}"
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    assert diff <= atol, f"{what}: max |ours - reference| = {diff:.3g} > {atol:.3g}"
    return diff


def recording_meta(repository: str, checkout: Path, commit: str | None) -> dict[str, Any]:
    """Where the golden outputs came from: the reference repository and commit, the command and the versions."""
    import os
    import platform
    import subprocess
    import sys

    import open_clip

    if not commit:
        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as err:
            raise SystemExit(f"{checkout} is not a git checkout: pass --reference-commit") from err
    return {
        "reference": {"repository": repository, "commit": commit},
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], FIXTURES.parents[2]), *sys.argv[1:]]),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
    }  # fmt: skip


# ---- DGL ----------------------------------------------------------------------------------------------------------
def dgl_setup(meta: Mapping[str, Any], latent: str, backbone: vlprompt.Backbone) -> tuple[Method, Tensor, Tensor]:
    """``(method, video [B, T, 3, S, S], tokens [B, words])`` of the DGL golden configuration."""
    method = build_seeded_method(meta, {**meta["options"], "latent": latent}, backbone)
    method.max_words = int(meta["words"])
    size = backbone.image_size
    video = seeded_normal((int(meta["videos"]), int(meta["frames"]), 3, size, size), int(meta["seed"]), "video")
    return method, video, method.tokenize(meta["captions"])


def dgl_outputs(method: Method, video: Tensor, tokens: Tensor, seed: int) -> tuple[dict[str, Tensor], list[str]]:
    """Ours: normalised video and text embeddings, the loss, and the gradient summaries of the prompts."""
    with torch.no_grad():
        plans = method.plans()
        out = {"video": method.encode_video(video, None, plans), "text": method.encode_text(tokens, plans)}
    method.zero_grad(set_to_none=True)
    loss = method(video, tokens)
    loss.backward()
    names, norms, projections = grad_summary(trainable_grads(method.named_parameters()), seed)
    out.update(loss=loss.detach(), grad_norm=torch.from_numpy(norms), grad_projection=torch.from_numpy(projections))
    return out, names


# ---- LPI ----------------------------------------------------------------------------------------------------------
def lpi_setup(meta: Mapping[str, Any], backbone: vlprompt.Backbone) -> tuple[Method, Tensor]:
    """``(method, images [B, 3, S, S])`` of the LPI golden configuration: ``meta["options"]["num_tasks"]`` tasks
    of LPI's COCO order with its related-task matrix, task ``meta["task"]`` current."""
    method = build_seeded_method(meta, meta["options"], backbone)
    tasks = coco_task_sequence()[: method.num_tasks]
    method.set_task_relation(torch.as_tensor(task_relation(tasks, COCO_TASK_POSITIVES)))
    method.begin_task(int(meta["task"]))
    size = backbone.image_size
    return method, seeded_normal((len(meta["captions"]), 3, size, size), int(meta["seed"]), "images")


def lpi_outputs(method: Method, images: Tensor, captions: list[str], centres_image: Tensor,
                centres_text: Tensor) -> dict[str, Tensor]:  # fmt: skip
    """Ours, named as the reference's golden outputs: the token ids; the current task's training features, loss
    (total and each weighted term) and prompt gradients; the frozen routing-key features; with the routers' keys
    set to ``centres_*`` ``[T, K, E]``, the routed task and evaluation features of every image and caption."""
    o, task = method.options, method.current_task
    tokens = method.tokenize(captions)
    out: dict[str, Tensor] = {"tokens": tokens}
    with torch.no_grad():
        plans = method.task_plans(task)
        out.update(image=method.encode_image(images, plans), text=method.encode_text(tokens, plans))
    method.zero_grad(set_to_none=True)
    loss = method(images, tokens)
    loss.backward()
    terms = method.loss_terms
    out.update(loss=loss.detach(), loss_clip=torch.tensor(terms["clip"]),
               loss_align=torch.tensor(o.align_weight * terms.get("align", 0.0)),
               loss_task=torch.tensor(o.task_weight * terms.get("task", 0.0)))  # fmt: skip
    out.update({f"grad.{n}": g for n, g in trainable_grads(method.named_parameters()).items()})
    with torch.no_grad():
        out.update(key_image=method.frozen_image_features(images), key_text=method.frozen_text_features(captions))
        for router, centres in ((method.image_router, centres_image), (method.text_router, centres_text)):
            router.keys.copy_(centres)
            router.valid.fill_(True)
        out["eval_image"], out["route_image"] = method.encode_images_eval(images)
        out["eval_text"], out["route_text"] = method.encode_texts_eval(captions)
    return out
