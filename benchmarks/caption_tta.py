"""Seconds per image of RLCF captioning TTA: vlprompt's loop against one with the reference's pass structure (JSON).

    python benchmarks/caption_tta.py                                    # embedded tiny CLIPs, tiny random OPT, CPU
    python benchmarks/caption_tta.py --policy ViT-B-16 --reward ViT-L-14 --lm random:opt --device cuda --images 4

Both loops adapt the same mapper on the same images with the same reward model and must give the same captions
(checked, reported as ``same_captions``). The **reference structure** (RLCF ``caption/capdec_tta.py``), per image:
T x {the mapper on the image embedding and a K-beam search without grad; the reward text features of the K captions;
the mapper again on the embedding repeated K times and a teacher-forced forward/backward of the K sequences each
behind its own copy of the prefix, logits at every position (the loss reads the caption's); an AdamW step}, then
the mapper once more and a beam-5 search, then the mapper
reloaded from a saved state dict and the optimizer from its saved state. **Ours** (``rlcf_caption`` with
``runners.tta``): the mapper once per step (its prefix shared by the beam search and the teacher-forced pass), the K
captions read after one shared prefix (its keys and values computed once), the beam search of
``backbone/beam_search.py`` (transformers' ``generate``'s rules and results, the prefix read once per image; the
reference structure runs ``generate`` itself), each distinct caption's reward text features computed once per image
and read up to its end-of-text (the reference encodes the K captions again at every step, on the full context),
restore in place. The reward's image
features are computed once per image in both. Weights are random; ``--lm`` picks the language model
(``random:opt`` is OPT-125m's shape; the default is a 2-layer OPT of width 64 on open_clip's BPE vocabulary;
``world`` is the embedded world's shipped captioner: the world tiny CLIP, its ClipCap mapper and compact-vocabulary
LM, the world small CLIP as reward, with trained weights).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import emit, environment

import vlprompt
from vlprompt.backbone.captioner import Captioner, CaptionTokenizer, MapperConfig, build_mapper, load_causal_lm
from vlprompt.methods import build_method
from vlprompt.methods.captioning import teacher_forcing
from vlprompt.methods.rlcf import RewardCLIP
from vlprompt.methods.rlcf_caption import RLCFCaption, RLCFCaptionOptions
from vlprompt.runners.tta import EpisodicState, adapt


def tiny_opt(vocab: int):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=49406,
                    eos_token_id=49407)  # fmt: skip
    return OPTForCausalLM(cfg)


def build_world_policy(args: argparse.Namespace, device: torch.device) -> RLCFCaption:
    """The embedded world's shipped ClipCap captioner on the world tiny CLIP, rewarded by the world small CLIP (the
    demo's ``caption`` section and ``configs/world/rlcf_caption_clipcap.yaml``)."""
    clip = vlprompt.load_backbone("vlprompt-tiny", pretrained="world", device=device)
    section = {"name": "rlcf_caption", "lm": "vlprompt-world-lm", "mapper_weights": "vlprompt-world-clipcap",
               "prefix_length": 8, "clip_length": 8, "mapper_layers": 2, "mapper_heads": 4,
               "max_new_tokens": args.max_new_tokens, "sample_k": args.k}  # fmt: skip
    method = build_method(section, clip).to(device)
    method.attach_reward(RewardCLIP([vlprompt.load_backbone("vlprompt-small", pretrained="world", device=device)]))
    return method


def build_policy(args: argparse.Namespace, device: torch.device) -> RLCFCaption:
    if args.lm == "world":
        return build_world_policy(args, device)
    torch.manual_seed(0)
    clip = vlprompt.load_backbone(args.policy, pretrained=None, device=device)
    tokenizer = CaptionTokenizer.clip_bpe()
    lm = tiny_opt(tokenizer.vocab_size) if args.lm == "tiny" else load_causal_lm(args.lm)
    if args.lm != "tiny":
        from vlprompt.backbone.captioner import load_tokenizer

        tokenizer = load_tokenizer(args.lm, "auto")
    embed = int(lm.get_input_embeddings().weight.shape[1])
    layers = 8 if args.lm != "tiny" else 2
    mapper = build_mapper(MapperConfig("transformer", clip.embed_dim, embed, args.prefix, args.prefix, layers, 8))
    captioner = Captioner(mapper, lm, tokenizer).to(device)
    options = RLCFCaptionOptions(prefix_length=args.prefix, sample_k=args.k, max_new_tokens=args.max_new_tokens,
                                 final_beams=5)  # fmt: skip
    method = RLCFCaption(clip, options, captioner=captioner)
    torch.manual_seed(1)
    reward = vlprompt.load_backbone(args.reward, pretrained=None, device=device)
    method.attach_reward(RewardCLIP([reward]))
    return method


def reference_image(method: RLCFCaption, image: torch.Tensor, steps: int, optimizer, saved_mapper, saved_opt) -> str:
    """One image in the reference's pass structure (see the module docstring)."""
    cap, o = method.captioner, method.options
    embedding = method.clip_embedding(image)  # the reference encodes the batch's images once
    reward_image = method.reward.image_features(image, method.backbone.image_mean, method.backbone.image_std)
    for _ in range(steps):
        with torch.no_grad():
            captions = cap.generate(cap.prefix(embedding), o.sample_k, o.sample_k, o.max_new_tokens)[0]
            index = torch.arange(len(captions)).unsqueeze(0)
            texts = [  # the reference's CLIP encodes its full 77-token context
                torch.nn.functional.normalize(m.model.encode_text(m.tokenizer(captions).to(m.device)).float(), dim=-1)
                for m in method.reward.models
            ]
            scores = method.reward.score(reward_image, texts, index)
            rewards = (scores - scores.mean(dim=-1, keepdim=True))[0]
        forcing = teacher_forcing(cap.tokenizer, captions).to(image.device)
        prefix = cap.prefix(embedding.repeat(len(captions), 1))  # the mapper on K copies
        embeds = torch.cat([prefix, cap.lm.get_input_embeddings()(forcing.input_ids)], dim=1)
        mask = torch.cat([forcing.attention_mask.new_ones(len(captions), prefix.shape[1]), forcing.attention_mask], 1)
        logits = cap.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, -forcing.keep :]  # every position's
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), forcing.targets.flatten(),
                                               reduction="none", ignore_index=-100)  # fmt: skip
        loss = (rewards.to(ce) * (ce.view_as(forcing.weights) * forcing.weights).sum(1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        caption = cap.generate(cap.prefix(embedding), 5, 1, o.max_new_tokens)[0][0]
    cap.mapper.load_state_dict(saved_mapper)  # the reference's reset_initial() and optimizer.load_state_dict()
    optimizer.load_state_dict(saved_opt)
    return caption


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="vlprompt-tiny")
    p.add_argument("--reward", default="vlprompt-tiny")
    p.add_argument(
        "--lm", default="tiny", help="tiny | world (the shipped captioner) | random:opt | random:gpt2 | a folder"
    )
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--prefix", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    method = build_policy(args, device)
    size = method.backbone.image_size
    gen = torch.Generator().manual_seed(3)
    images = [torch.randn(1, 3, size, size, generator=gen).to(device) for _ in range(args.images)]
    params = method.trainable_parameters()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # the reference's structure (its beam search: transformers' generate)
    method.captioner.beam_impl = "transformers"
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=1e-6, weight_decay=0.0)
    saved_mapper, saved_opt = (
        copy.deepcopy(method.captioner.mapper.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
    )
    reference_image(method, images[0], 1, optimizer, saved_mapper, saved_opt)  # warm-up
    sync()
    start = time.perf_counter()
    ref_caps = [reference_image(method, im, args.steps, optimizer, saved_mapper, saved_opt) for im in images]
    sync()
    ref_s = (time.perf_counter() - start) / len(images)

    # ours
    method.captioner.beam_impl = "vlprompt"
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=1e-6, weight_decay=0.0)
    state = EpisodicState(params, optimizer)
    ep = method.begin(images[0])
    adapt(method, ep, 1, optimizer)
    state.finish_sample()
    sync()
    start = time.perf_counter()
    ours_caps = []
    for im in images:
        ep = method.begin(im)
        adapt(method, ep, args.steps, optimizer)
        ours_caps.append(method.predict(ep))
        state.finish_sample()
    sync()
    ours_s = (time.perf_counter() - start) / len(images)
    emit(
        {
            "benchmark": "caption_tta",
            "policy": args.policy,
            "reward": args.reward,
            "lm": args.lm,
            "images": args.images,
            "steps": args.steps,
            "k": args.k,
            "prefix_length": args.prefix,
            "max_new_tokens": args.max_new_tokens,
            **environment(device),
            "reference_structure_s_per_image": round(ref_s, 4),
            "ours_s_per_image": round(ours_s, 4),
            "speedup": round(ref_s / ours_s, 3),
            "same_captions": ref_caps == ours_caps,
            "captions": ours_caps,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
