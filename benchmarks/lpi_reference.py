"""LPI beside the reference implementation: same weights, same inputs; output parity, and the golden fixture.

    python benchmarks/lpi_reference.py --reference PATH/TO/LPI [--record tests/fixtures/golden]

PATH is a checkout of https://github.com/Kelvin-ywc/LPI (its ``retrieval/`` folder, S-Prompts based, is read
from disk at run time, never copied here). The reference runs as its trainer drives it, fp32 on the CPU:

- ``models.slinet.SliNet`` (the reference's CLIP, text encoder, prompt learners and per-task
  ``DecomposedPrompt``) with ``load_clip_to_cpu`` handed the reference's own ``build_model`` of our seeded
  weights (then back to fp32: the release converts CLIP to fp16; parity is checked at fp32);
- a training step of the current task: ``SliNet.forward`` + ``cal_loss`` (CLIP, layer-alignment and
  task-contrast terms, its ``MID/task_sim_matrix.txt``), backward with only ``prompts.<task>.`` trainable;
- routing keys and task selection: ``extract_vector`` / ``extract_textual_vector`` (frozen features of the
  images and of ``"X" * 16 + " " + caption + "."``), ``SPrompts.get_visual_task_id`` / ``get_textual_task_id``
  over given K-means centres, then ``visual_interface`` / ``textual_interface`` (evaluation encodings).

Two things are adapted, neither in the maths: third-party modules the reference imports but these paths never
call (scikit-learn's KMeans, scipy's cdist, loguru) are stood in for when absent, and its hard-coded ``.cuda()``
calls are made no-ops so it runs on the CPU.

Prints one JSON object with max |ours - reference| per output. ``--record DIR`` also writes the golden fixture
``DIR/lpi.npz`` + ``DIR/lpi.json`` (checked by ``tests/methods/test_golden_lpi.py`` on every test run).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from common import load_golden

#: Third-party modules the reference imports at module level but the recorded paths never use.
UNUSED_IMPORTS = ("sklearn", "sklearn.cluster", "scipy", "scipy.spatial", "scipy.spatial.distance", "loguru")
#: The reference ``DecomposedPrompt`` factors → ours (``vlprompt.prompts.lpi.DecomposedPrompt``).
FACTORS = {"dim_1_share": "layer", "dim_2_visual": "token_v", "dim_2_textual": "token_t",
           "dim_3_visual": "channel_v", "dim_3_textual": "channel_t"}  # fmt: skip
#: The golden configuration: a 3-layer CLIP, 5 of LPI's 12 COCO tasks with task 4 (accessory, related to task
#: 0, appliance) current, so the task-contrast loss has a related and unrelated tasks; the release's depth 1.
GOLDEN = {
    "seed": 0,
    "model_cfg": {
        "embed_dim": 64, "quick_gelu": True,  # the reference's blocks use QuickGELU and width/64 heads
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
    },
    "options": {"name": "lpi", "num_tasks": 5, "n_tokens": 16, "layers": 9, "rank": 4, "depth": 1,
                "insert_before_ln_pre": True, "align_weight": 0.1, "align_temperature": 0.01,
                "align_normalize": False, "task_weight": 0.1, "task_temperature": 0.001, "double_sigmoid": True,
                "interact": False, "n_keys": 5, "text_keys_with_placeholders": True, "caption_suffix": "."},
    "task": 4,
    "captions": ["a toaster sitting on a kitchen counter", "a man swinging a tennis racket at a ball",
                 "a red fire hydrant on the sidewalk", "a laptop computer on a wooden desk",
                 "a woman holding an umbrella in the rain"],
    # query i of each modality gets a key of task ROUTES[modality][i] near its frozen feature (clear margins)
    "routes": {"image": [2, 0, 4, 1, 3], "text": [1, 3, 0, 4, 2]},
}  # fmt: skip


class _Absent(types.ModuleType):
    """Stands in for a missing third-party module; any use raises, so a recorded path cannot depend on it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self.__path__: list[str] = []

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def absent(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{attr} is not installed; the reference path called it")

        return absent


def import_reference(path: Path) -> dict[str, types.ModuleType]:
    """The reference's ``retrieval/`` modules (on ``sys.path``), absent unused third-party imports stood in for."""
    retrieval = path / "retrieval"
    if not (retrieval / "models" / "slinet.py").exists():
        raise SystemExit(f"{path} is not a checkout of Kelvin-ywc/LPI (no retrieval/models/slinet.py)")
    missing = [n for n in UNUSED_IMPORTS if importlib.util.find_spec(n.split(".")[0]) is None]
    for name in missing:
        sys.modules.setdefault(name, _Absent(name))
    sys.path.insert(0, str(retrieval))
    names = ("models.clip.model", "models.slinet", "methods.sprompt")
    return {n.rsplit(".", 1)[-1]: importlib.import_module(n) for n in names}


@contextlib.contextmanager
def on_cpu(directory: Path) -> Iterator[None]:
    """Run the reference's hard-coded ``.cuda()`` calls as no-ops, inside ``directory`` (it reads ``./MID``)."""
    saved = torch.Tensor.cuda, torch.cuda.current_device, torch.cuda.device_count, os.getcwd()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.current_device, torch.cuda.device_count = (lambda: 0), (lambda: 1)
    os.chdir(directory)
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.current_device, torch.cuda.device_count, cwd = saved
        os.chdir(cwd)


def reference_network(ref: dict[str, types.ModuleType], method, num_tasks: int, task: int) -> torch.nn.Module:
    """``SliNet`` with our backbone's frozen weights and our per-task prompts, task ``task`` current."""
    state = {k: v.clone() for k, v in method.backbone.model.state_dict().items() if k != "attn_mask"}
    clip_model = ref["model"].build_model(dict(state), {"net_type": "slip"}, {})  # fp16, as released
    clip_model.float().load_state_dict(state)  # back to fp32 with the exact weights
    ref["slinet"].load_clip_to_cpu = lambda args: clip_model
    o = method.options
    args = {"backbonename": "ViT-B/16", "NCTX": o.n_tokens, "CTXINIT": "", "CSC": False,
            "CLASS_TOKEN_POSITION": "end", "prompt_type": "lpi", "prompt_length": o.n_tokens,
            "visual_dim": method.backbone.vision_width, "textual_dim": method.backbone.text_width,
            "total_sessions": num_tasks, "dataset": "coco", "net_type": "slip"}  # fmt: skip
    net = ref["slinet"].SliNet(args)
    with torch.no_grad():
        for t, prompt in enumerate(net.prompts):
            for theirs, ours in FACTORS.items():
                getattr(prompt, theirs).copy_(getattr(method.prompts[t], ours))
    net.numtask = task + 1  # update_fc has run once per task
    for name, p in net.named_parameters():  # the trainer's freezing: only prompts.<task>. train
        p.requires_grad_(f"prompts.{task}." in name)
    return net


def planted_centres(features: torch.Tensor, routes: list[int], num_tasks: int, keys: int, seed: int, golden,
                    name: str) -> torch.Tensor:  # fmt: skip
    """Keys ``[T, K, E]``: seeded random unit vectors, with key 0 of task ``routes[i]`` next to query ``i``.

    Query 0's own key is off by 0.1 in one coordinate (L1 = L2 = 0.1) and key 1 of task ``routes[1]`` is a decoy
    off by 0.0025 in every coordinate (L1 = 0.0025·E, L2 = 0.0025·√E): with E = 64 the decoy is farther in L1
    (0.16) but nearer in L2 (0.02), so routing by L2 instead of S-Prompts' L1 sends query 0 elsewhere.
    """
    dim = features.shape[1]
    centres = F.normalize(golden.seeded_normal((num_tasks, keys, dim), seed, name), dim=-1)
    for i, task in enumerate(routes):
        noise = golden.seeded_normal((dim,), seed, f"{name}:{i}")
        centres[task, 0] = F.normalize(features[i] + 0.002 * noise, dim=0)
    centres[routes[0], 0] = features[0] + 0.1 * F.one_hot(torch.tensor(0), dim)
    centres[routes[1], 1] = features[0] + 0.0025 * golden.seeded_normal((dim,), seed, f"{name}:decoy").sign()
    l2_route = torch.cdist(features[:1], centres.flatten(0, 1)).argmin() // keys
    if int(l2_route) != routes[1]:
        raise RuntimeError("the L1/L2 decoy key does not separate the two metrics")
    return centres


def reference_outputs(ref, net, images: torch.Tensor, captions: list[str], golden, meta: dict) -> dict:
    """The reference's golden outputs, named as :func:`golden.lpi_outputs` names ours."""
    out: dict[str, torch.Tensor] = {}
    net.zero_grad(set_to_none=True)
    image, text, visual_prompt, textual_prompt = net(images, captions)
    losses = net.cal_loss(image, text, visual_prompt, textual_prompt)["loss"]
    loss = sum(losses.values())  # the trainer's sum of the logged terms
    loss.backward()
    _, tokens = net.classifier_pool[meta["task"]](captions, textual_prompt[:, 0])  # the ids it encoded
    out.update(tokens=tokens, image=image, text=text, loss=loss, loss_clip=losses["base_loss"],
               loss_align=losses["alignment_loss"], loss_task=losses["task_loss"])  # fmt: skip
    for name, grad in golden.trainable_grads(net.named_parameters()).items():
        task, factor = name.split(".")[1:]
        out[f"grad.prompts.{task}.{FACTORS[factor]}"] = grad
    net.eval()  # textual_interface branches on training
    with torch.no_grad():
        out.update(key_image=net.extract_vector(images), key_text=net.extract_textual_vector(captions))
        num_tasks, keys, seed = meta["options"]["num_tasks"], meta["options"]["n_keys"], meta["seed"]
        centres = {m: planted_centres(out[f"key_{m}"], meta["routes"][m], num_tasks, keys, seed, golden,
                                      f"centres_{m}") for m in ("image", "text")}  # fmt: skip
        learner = types.SimpleNamespace(_network=net, all_keys=list(centres["image"]),
                                        textual_all_keys=list(centres["text"]))  # fmt: skip
        out["route_image"] = ref["sprompt"].SPrompts.get_visual_task_id(learner, images)
        out["route_text"] = ref["sprompt"].SPrompts.get_textual_task_id(learner, captions)
        out["eval_image"] = net.visual_interface(images, out["route_image"])
        out["eval_text"] = net.textual_interface(captions, out["route_text"])
        out.update(centres_image=centres["image"], centres_text=centres["text"])
        margins = {m: golden.routing_margin(out[f"key_{m}"], centres[m]) for m in ("image", "text")}
    return {k: v.detach() for k, v in out.items()}, margins


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, required=True, help="checkout of Kelvin-ywc/LPI")
    p.add_argument("--record", type=Path, help="also write the golden fixture lpi.npz/.json here")
    p.add_argument("--reference-commit", help="commit of --reference when it is not a git checkout")
    args = p.parse_args()
    golden = load_golden()
    ref = import_reference(args.reference)
    meta = dict(GOLDEN)
    backbone = golden.build_backbone(meta["model_cfg"])
    method, images = golden.lpi_setup(meta, backbone)
    net = reference_network(ref, method, meta["options"]["num_tasks"], meta["task"])
    with on_cpu(args.reference / "retrieval"):
        theirs, margins = reference_outputs(ref, net, images, meta["captions"], golden, meta)
    if min(margins.values()) < 1e-2:  # near-ties would make the recorded routes depend on rounding
        raise SystemExit(f"routing margins {margins} are too small for a golden routing check")
    ours = golden.lpi_outputs(method, images, meta["captions"], theirs["centres_image"], theirs["centres_text"])
    diffs = {k: float((ours[k].double() - theirs[k].double()).abs().max()) for k in sorted(ours)}
    report = {"benchmark": "lpi_reference", "max_abs_diff_ours_vs_reference": diffs, "routing_margins": margins}
    if args.record:
        meta.update(golden.recording_meta("Kelvin-ywc/LPI", args.reference, args.reference_commit),
                    routing_margins=margins, recorded_max_abs_diff=diffs)  # fmt: skip
        arrays = {k: v.cpu().numpy() for k, v in theirs.items()}
        paths = golden.write_fixture("lpi", meta, arrays, args.record)
        report["written"] = {str(p): p.stat().st_size for p in paths}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
