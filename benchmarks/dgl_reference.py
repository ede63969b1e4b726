"""DGL beside the reference implementation: same weights, same inputs; output parity, then step times.

    python benchmarks/dgl_reference.py --reference PATH/TO/DGL [--model ViT-B-32-quickgelu] [--autocast bf16]
    python benchmarks/dgl_reference.py --reference PATH/TO/DGL --record tests/fixtures/golden

PATH is a checkout of https://github.com/knightyxp/DGL (CC BY-NC 4.0; it is read from disk at run time, never
copied here). Its ``modules/clip.py`` is imported without the package ``__init__`` (which pulls in the
training stack). The reference step follows ``CLIP4Clip.forward`` on one process: prompts generated for every
caption of the batch (``encode_prompt(batch_size)``), text and video encoded with them, logits at CLIP's scale,
the symmetric cross entropy, backward, AdamW. Ours runs with the reference's behaviour options
(``video_embedding=global_prompt0``, ``postfix=inert``) so that the outputs are comparable.

Prints one JSON object: max |difference| of the video and text embeddings and of the loss, and for each latent
space the median train-step and eval-forward seconds of ours, the reference, and the frozen-tower floor.

``--record DIR`` instead runs the reference on the small seeded configuration :data:`GOLDEN` (a 3-layer CLIP
with the 768-wide vision tower the reference hard-codes for its global prompts, 3 videos of 3 frames, 3
captions), fp32 on the CPU, and writes its outputs as the golden fixture ``DIR/dgl.npz`` + ``DIR/dgl.json``
(``tests/methods/test_golden_dgl.py`` checks ours against it on every test run): the token ids fed to it and, per
latent space, the normalised video and text embeddings, the loss, and the L2 norm and seeded-direction projection
of the loss's gradient for every prompt tensor (under our names, through ``from_reference_state_dict``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import environment, load_golden, median_seconds, peak_memory_mb
from dgl_step import floor

import vlprompt
from vlprompt.methods import build_method
from vlprompt.methods.dgl import from_reference_state_dict, to_reference_state_dict

CAPTION = "a man is playing a guitar on a stage in front of a crowd"
#: The golden configuration: small enough for a test on two CPU cores, every prompt path of the reference used.
GOLDEN = {
    "seed": 0,
    "model_cfg": {
        "embed_dim": 64, "quick_gelu": True,  # the reference's blocks use QuickGELU and width/64 heads
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 768, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
    },
    "options": {"name": "dgl", "frames": 3, "n_global": 4, "n_local": 4, "depth": 0,
                "video_embedding": "global_prompt0", "postfix": "inert"},
    "latents": ["linear", "transformer"],
    "videos": 3, "frames": 3, "words": 32,
    "captions": ["a man is playing a guitar on a stage", "a cat jumps onto a red sofa",
                 "two people are cooking pasta in a small kitchen while talking about the weather"],
}  # fmt: skip


def import_reference_clip(path: Path) -> types.ModuleType:
    """``modules/clip.py`` of the reference as module ``dglref.clip`` (relative imports resolve in ``modules/``)."""
    package = types.ModuleType("dglref")
    package.__path__ = [str(path / "modules")]
    sys.modules["dglref"] = package
    return importlib.import_module("dglref.clip")


def reference_model(ref_clip: types.ModuleType, method, latent: str, frames: int, words: int) -> torch.nn.Module:
    """The reference CLIP with our backbone's frozen weights and our method's prompt weights."""
    clip_sd = {k: v for k, v in method.backbone.model.state_dict().items() if k != "attn_mask"}
    args = Namespace(
        shared_latent_space=latent, text_prompt_length=2 * method.options.n_local,
        local_each_frame_prompt_length=method.options.n_local, global_visual_prompt_length=method.options.n_global,
        unified_transformer_layers=method.prompts.depth, visual_output_type="global_prompt0", max_words=words,
        time_embedding=0,
    )  # fmt: skip
    model, _ = ref_clip.build_clip_model(
        dict(clip_sd), convert_fp16=False, load_state_dict=False, is_eval=False, video_frames=frames, args=args
    )
    prompts = {k.removeprefix("clip."): v for k, v in to_reference_state_dict(method).items()}
    missing, _ = model.load_state_dict({**clip_sd, **prompts}, strict=False)
    if unexpected := [k for k in missing if k != "visual.position_ids"]:
        raise RuntimeError(f"reference model left uninitialised: {unexpected}")
    trainable = set(prompts)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model.to(method.backbone.device)


def reference_encode(model, tokens: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``CLIP4Clip.forward``'s pass: prompts per caption, then text and video; normalised embeddings."""
    text_prompt, visual_prompt = model.encode_prompt(tokens.shape[0], device=tokens.device)
    text = model.encode_text(tokens, text_prompt).float()
    frames = video.shape[1]
    vis = model.encode_image(video.flatten(0, 1), visual_prompt, video_frame=frames).float().squeeze(1)
    return F.normalize(vis, dim=-1), F.normalize(text, dim=-1)


def reference_loss(model, tokens: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """The reference's symmetric cross entropy at CLIP's logit scale."""
    vis, text = reference_encode(model, tokens, video)
    logits = model.logit_scale.exp() * text @ vis.t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def parity(method, model, tokens: torch.Tensor, video: torch.Tensor) -> dict[str, float]:
    """Max |ours - reference| of the embeddings and the loss, fp32, same weights and inputs."""
    with torch.no_grad():
        plans = method.plans()
        ours_v, ours_t = method.encode_video(video, None, plans), method.encode_text(tokens, plans)
        ref_v, ref_t = reference_encode(model, tokens, video)
        ours_loss, ref_loss = method(video, tokens).item(), reference_loss(model, tokens, video).item()
    return {
        "video_max_abs_diff": float((ours_v - ref_v).abs().max()),
        "text_max_abs_diff": float((ours_t - ref_t).abs().max()),
        "loss_abs_diff": abs(ours_loss - ref_loss),
    }


def reference_outputs(model, tokens: torch.Tensor, video: torch.Tensor, latent: str, golden, seed: int):
    """The reference's embeddings, loss and prompt-gradient summaries (our names), as :func:`golden.dgl_outputs`."""
    with torch.no_grad():
        ref_v, ref_t = reference_encode(model, tokens, video)
    model.zero_grad(set_to_none=True)
    loss = reference_loss(model, tokens, video)
    loss.backward()
    theirs = golden.trainable_grads(model.named_parameters())
    grads = from_reference_state_dict({"clip." + k: g for k, g in theirs.items()}, latent)
    names, norms, projections = golden.grad_summary(grads, seed)
    out = {"video": ref_v, "text": ref_t, "loss": loss.detach(), "grad_norm": torch.from_numpy(norms),
           "grad_projection": torch.from_numpy(projections)}  # fmt: skip
    return out, names


def record(args: argparse.Namespace, ref_clip: types.ModuleType) -> dict:
    """Run the reference on :data:`GOLDEN` and write the golden fixture ``dgl`` under ``args.record``."""
    golden = load_golden()
    meta = {**GOLDEN, **golden.recording_meta("knightyxp/DGL", args.reference, args.reference_commit)}
    backbone = golden.build_backbone(GOLDEN["model_cfg"])
    arrays, diffs, grad_names = {}, {}, {}
    for latent in GOLDEN["latents"]:
        method, video, tokens = golden.dgl_setup(GOLDEN, latent, backbone)
        model = reference_model(ref_clip, method, latent, GOLDEN["frames"], GOLDEN["words"])
        ref, names = reference_outputs(model, tokens, video, latent, golden, GOLDEN["seed"])
        ours, our_names = golden.dgl_outputs(method, video, tokens, GOLDEN["seed"])
        if names != our_names:
            raise RuntimeError(f"{latent}: reference prompt tensors {names} differ from ours {our_names}")
        grad_names[latent] = names
        arrays.setdefault("tokens", tokens.cpu().numpy())  # the same ids for both latent spaces
        for key, value in ref.items():
            arrays[f"{latent}.{key}"] = value.detach().cpu().numpy()
        diffs[latent] = {k: float((ours[k].double() - ref[k].double()).abs().max()) for k in ref}
    meta.update(grad_names=grad_names, recorded_max_abs_diff=diffs)
    paths = golden.write_fixture("dgl", meta, arrays, args.record)
    return {"benchmark": "dgl_reference --record", "written": {str(p): p.stat().st_size for p in paths},
            "max_abs_diff_ours_vs_reference": diffs}  # fmt: skip


def timed_steps(loss_fn, params: list[torch.nn.Parameter], eval_fn, repeats: int, ctx) -> dict[str, float]:
    """Median train step (forward, loss, backward, AdamW) and eval forward."""
    optimizer = torch.optim.AdamW(params, lr=1e-6)  # tiny lr: the weights stay comparable across repeats

    def step() -> None:
        with ctx:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def evaluate() -> None:
        with ctx, torch.no_grad():
            eval_fn()

    train_s, eval_s = median_seconds(step, repeats), median_seconds(evaluate, repeats)
    return {"train_step_s": round(train_s, 3), "eval_forward_s": round(eval_s, 3)}


def compare(latent: str, args: argparse.Namespace, ref_clip: types.ModuleType, device: torch.device) -> dict:
    """Parity and timings of one latent space: ours (each precision), the reference (fp32), the floor."""
    torch.manual_seed(0)
    backbone = vlprompt.load_backbone(args.model, pretrained=None, device=device)
    options = {"name": "dgl", "latent": latent, "frames": args.frames, "video_embedding": "global_prompt0",
               "postfix": "inert"}  # fmt: skip
    method = build_method(options, backbone).to(device)
    method.max_words = args.words
    video = torch.randn(args.videos, args.frames, 3, backbone.image_size, backbone.image_size, device=device)
    tokens = method.tokenize([CAPTION] * args.videos).to(device)
    model = reference_model(ref_clip, method, latent, args.frames, args.words)
    row = {"parity_fp32": parity(method, model, tokens, video), "trainable": method.parameter_counts()["trainable"]}

    def ours_eval() -> None:
        plans = method.plans()
        method.encode_video(video, None, plans)
        method.encode_text(tokens, plans)

    ref_params = [q for q in model.parameters() if q.requires_grad]
    row["reference_fp32"] = timed_steps(
        lambda: reference_loss(model, tokens, video), ref_params, lambda: reference_encode(model, tokens, video),
        args.repeats, torch.autocast(device.type, enabled=False),
    )  # fmt: skip
    for precision in args.autocast.split(","):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        params = method.trainable_parameters()
        row[f"ours_{precision}"] = timed_steps(lambda: method(video, tokens), params, ours_eval, args.repeats, ctx)
        row[f"floor_{precision}"] = floor(backbone, video, Namespace(repeats=args.repeats), ctx)
    ref = row["reference_fp32"]["train_step_s"]
    row["ratios"] = {}
    for precision in args.autocast.split(","):
        ours = row[f"ours_{precision}"]["train_step_s"]
        floor_s = row[f"floor_{precision}"]["forward_backward_s"]
        row["ratios"][f"ours_{precision}_over_floor_fwd_bwd"] = round(ours / floor_s, 3)
        row["ratios"][f"reference_fp32_over_ours_{precision}"] = round(ref / ours, 3)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, required=True, help="checkout of knightyxp/DGL")
    p.add_argument("--model", default="ViT-B-32-quickgelu")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latents", default="linear,transformer")
    p.add_argument("--autocast", default="none,bf16", help="comma list of none|bf16 (ours; the reference runs fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--record", type=Path, help="write the golden fixture dgl.npz/.json here (CPU, fp32) and exit")
    p.add_argument("--reference-commit", help="commit of --reference when it is not a git checkout")
    args = p.parse_args()
    device = torch.device(args.device)
    ref_clip = import_reference_clip(args.reference)
    if args.record:
        print(json.dumps(record(args, ref_clip), indent=2))
        return
    results = {latent: compare(latent, args, ref_clip, device) for latent in args.latents.split(",")}
    print(json.dumps({
        "benchmark": "dgl_reference", "model": args.model, "videos": args.videos, "frames": args.frames,
        "captions": args.videos, "words": args.words, **environment(device),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "results": results,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
