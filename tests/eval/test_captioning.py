"""Captioning metrics: CLIPScore/RefCLIPScore on hand-made unit vectors; coco-caption metrics against hand-computed
values and against pycocoevalcap called directly; the unavailable paths (no Java, no SPICE models, no pycocoevalcap,
a failing Java process); the pure-Python tokenizer fallback against the Java tokenizer."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprompt.errors import DataError
from vlprompt.eval import captioning
from vlprompt.eval.captioning import (
    COCO_METRICS,
    caption_metrics,
    clip_score,
    clip_scores,
    ref_clip_score,
    ref_clip_scores,
)
from vlprompt.eval.rouge import rouge_l

# ----------------------------------------------------------------------------------------------------- CLIPScore

E0, E1, E2 = torch.eye(3, dtype=torch.float64)
C06 = 0.6 * E0 + 0.8 * E1  # cos(C06, E0) = 0.6, cos(C06, E1) = 0.8


def test_clip_score_is_w_times_clamped_cosine() -> None:
    images = torch.stack([E0, E0, E2])
    captions = torch.stack([5 * C06, -C06, E2 + E1])  # unnormalised on purpose: cosines 0.6, -0.6, 1/sqrt(2)
    per = clip_scores(images, captions)
    assert per.tolist() == pytest.approx([2.5 * 0.6, 0.0, 2.5 / math.sqrt(2)], abs=1e-12)
    assert clip_score(images, captions) == pytest.approx((1.5 + 2.5 / math.sqrt(2)) / 3, abs=1e-12)
    assert clip_score(images.numpy(), captions.numpy(), w=1.0) == pytest.approx((0.6 + 1 / math.sqrt(2)) / 3)


def test_ref_clip_score_is_the_per_image_harmonic_mean_with_the_best_unweighted_reference() -> None:
    # image 0: CLIP-S 1.5, references at cosines 0.8 and 0.6 -> best 0.8 (no w on it): H = 2*1.5*0.8/2.3
    # image 1: CLIP-S 2.5, one reference at cosine 0.2 -> H = 2*2.5*0.2/2.7
    images = torch.stack([E0, E0])
    captions = torch.stack([C06, E0])
    refs = [torch.stack([E1, E0]), torch.stack([0.2 * E0 + math.sqrt(0.96) * E2])]
    h0, h1 = 2 * 1.5 * 0.8 / 2.3, 2 * 2.5 * 0.2 / 2.7
    assert ref_clip_scores(images, captions, refs).tolist() == pytest.approx([h0, h1], abs=1e-12)
    assert ref_clip_score(images, captions, refs) == pytest.approx((h0 + h1) / 2, abs=1e-12)
    # the mean of per-image harmonic means, not the harmonic mean of the two means
    pooled = 2 * 2.0 * 0.5 / 2.5
    assert abs(ref_clip_score(images, captions, refs) - pooled) > 0.05


def test_ref_clip_score_clamps_negative_reference_cosines_and_zero_terms() -> None:
    images = torch.stack([E0, E0])
    captions = torch.stack([C06, -E0])  # image 1: CLIP-S 0
    refs = [torch.stack([-E1, -E0]), torch.stack([E0])]  # image 0: best reference cosine -0.6 -> 0
    assert ref_clip_scores(images, captions, refs).tolist() == [0.0, 0.0]


def test_ref_clip_score_takes_a_padded_tensor_or_ragged_lists_alike() -> None:
    gen = torch.Generator().manual_seed(0)
    img, cap, refs = (
        torch.randn(4, 8, generator=gen),
        torch.randn(4, 8, generator=gen),
        torch.randn(4, 3, 8, generator=gen),
    )
    as_list = ref_clip_scores(img, cap, [r.numpy() for r in refs])
    assert torch.allclose(ref_clip_scores(img, cap, refs), as_list, rtol=0, atol=1e-12)
    assert torch.allclose(
        ref_clip_scores(img, cap, [refs[0], refs[1, :1], refs[2], refs[3, :2]])[[0, 2]], as_list[[0, 2]]
    )


def test_clip_score_rejects_bad_features() -> None:
    with pytest.raises(ValueError, match="all-zero row"):
        clip_scores(torch.stack([E0, 0 * E0]), torch.stack([E0, E1]))
    with pytest.raises(ValueError, match="one shape"):
        clip_scores(torch.stack([E0]), torch.stack([E0, E1]))
    with pytest.raises(ValueError, match="one set per image"):
        ref_clip_scores(torch.stack([E0, E1]), torch.stack([E0, E1]), [torch.stack([E0])])
    with pytest.raises(ValueError, match=r"reference_feats_per_image\[1\]"):
        ref_clip_scores(torch.stack([E0, E1]), torch.stack([E0, E1]), [torch.stack([E0]), torch.zeros(0, 3)])


# ------------------------------------------------------------------------------------------ coco-caption metrics

# COCO-style captions (capitals, final periods, clitics, hyphens) on which both PTB tokenizers agree.
CANDIDATES = {
    391895: "A man with a red helmet on a small moped on a dirt road.",
    522418: "A woman wearing a net on her head cutting a cake.",
    184613: "A child holding a flowered umbrella and petting a yak.",
    318219: "A young boy in a red T-shirt is flying a kite.",
    554625: "Two dogs playing in the snow!",
    "x7": "A chef cooks in a restaurant's kitchen--it's busy.",
}
REFERENCES = {
    391895: ["A man riding a motor bike on a dirt road on the countryside.",
             "A man riding on the back of a motorcycle.",
             "A man with a red helmet rides a moped down a dirt road."],
    522418: ["A woman wearing a net on her head cutting a cake.",
             "A woman cutting a large white sheet cake.",
             "A woman in a hair net cuts a cake."],
    184613: ["A little boy holding an umbrella next to a yak.",
             "A child holding a flowered umbrella and petting a yak."],
    318219: ["A boy flies a kite in a park.", "A kid in a t-shirt flying a kite on a sunny day."],
    554625: ["Two dogs play in the snow.", "Dogs running through the snow.", "Two brown dogs in snow."],
    "x7": ["A cook works in a busy kitchen.", "A chef in a restaurant's kitchen doesn't stop."],
}  # fmt: skip
NO_JAVA = "needs Java (simulated by the test)"


@pytest.fixture(scope="module")
def meteor_inputs() -> dict[str, tuple]:
    """What pycocoevalcap's METEOR scorer received during :func:`with_java` (filled by it)."""
    return {}


@pytest.fixture(scope="module")
def with_java(meteor_inputs) -> captioning.CaptionMetrics:
    """All metrics of the shared set with Java (one tokenizer call, one METEOR start-up for every assert)."""
    if captioning.java_problem() is not None:
        pytest.skip(f"no Java here: {captioning.java_problem()}")
    from pycocoevalcap.meteor.meteor import Meteor

    original = Meteor.compute_score

    def spy(self, gts, res):
        meteor_inputs["args"] = (gts, res)
        return original(self, gts, res)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Meteor, "compute_score", spy)
        return caption_metrics(CANDIDATES, REFERENCES)


@pytest.fixture(scope="module")
def pycocoevalcap_direct() -> tuple[dict[str, float], dict, dict]:
    """The same set through pycocoevalcap's own classes, as its COCOEvalCap evaluates: the scores of BLEU, ROUGE-L
    and CIDEr, and the tokenized references and candidates every scorer (METEOR too) receives."""
    if captioning.java_problem() is not None:
        pytest.skip("pycocoevalcap's tokenizer needs Java")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in refs] for i, refs in REFERENCES.items()})
    res = tok.tokenize({i: [{"caption": c}] for i, c in CANDIDATES.items()})
    out = dict(zip(captioning.BLEU, Bleu(4).compute_score(gts, res, verbose=0)[0]))
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out, gts, res


def test_metrics_match_pycocoevalcap_called_directly(with_java, pycocoevalcap_direct, meteor_inputs) -> None:
    direct, gts, res = pycocoevalcap_direct
    assert with_java.tokenizer == captioning.TOKENIZER_JAVA
    assert list(with_java.scores) == list(COCO_METRICS)
    for metric, value in direct.items():
        assert with_java[metric] == pytest.approx(value, rel=1e-12), metric
    # METEOR is pycocoevalcap's own scorer (one Java start-up is enough): it must get what COCOEvalCap gives it
    our_gts, our_res = meteor_inputs["args"]
    ids = list(CANDIDATES)
    assert {ids[n]: v for n, v in our_gts.items()} == gts and {ids[n]: v for n, v in our_res.items()} == res
    assert 0.1 < with_java["METEOR"] < 1 and 0.1 < with_java["BLEU-4"] < with_java["BLEU-1"] < 1
    assert with_java.unavailable.keys() <= {"SPICE"}


def test_spice_runs_or_names_the_missing_models(with_java) -> None:
    if with_java["SPICE"] is None:
        reason = with_java.unavailable["SPICE"]
        assert "stanford-corenlp-3.6.0" in reason and "get_stanford_models" in reason
    else:
        assert 0 < with_java["SPICE"] <= 1 and "SPICE" not in with_java.unavailable


def test_python_tokenizer_fallback_gives_the_java_numbers(with_java, monkeypatch) -> None:
    monkeypatch.setattr(captioning, "java_problem", lambda: NO_JAVA)
    without = caption_metrics(CANDIDATES, REFERENCES)
    assert without.tokenizer.startswith(captioning.TOKENIZER_PYTHON) and NO_JAVA in without.tokenizer
    for metric in (*captioning.BLEU, "ROUGE-L", "CIDEr"):
        assert without[metric] == pytest.approx(with_java[metric], rel=1e-12), metric


def test_without_java_meteor_and_spice_are_unavailable_not_zero(monkeypatch) -> None:
    monkeypatch.setattr(captioning, "java_problem", lambda: NO_JAVA)
    out = caption_metrics(CANDIDATES, REFERENCES)
    assert out["METEOR"] is None and out["SPICE"] is None
    assert out.unavailable == {"METEOR": NO_JAVA, "SPICE": NO_JAVA}
    assert all(isinstance(out[m], float) and out[m] > 0 for m in (*captioning.BLEU, "ROUGE-L", "CIDEr"))
    as_dict = out.as_dict()
    assert as_dict["METEOR"] is None and as_dict["unavailable"]["SPICE"] == NO_JAVA and as_dict["num_images"] == 6


@pytest.fixture
def python_tokens(monkeypatch) -> None:
    """Known values below use the pure-Python tokenizer (no Java start): they test the scoring, not the tokenizer."""
    monkeypatch.setattr(captioning, "java_problem", lambda: NO_JAVA)


def test_identical_candidates_give_bleu_and_rouge_one_and_cider_d_ten(python_tokens) -> None:
    # One reference each, every n-gram of a caption absent from the other images: all CIDEr-D n-gram vectors are
    # non-zero and identical, so each cosine is 1 and CIDEr-D = 10 * 1 (no length penalty).
    refs = {i: [c] for i, c in CANDIDATES.items()}
    out = caption_metrics(CANDIDATES, refs, metrics=[*captioning.BLEU, "ROUGE-L", "CIDEr"])
    for metric in captioning.BLEU:
        assert out[metric] == pytest.approx(1.0, abs=1e-8), metric
    assert out["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)
    assert out["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert out.unavailable == {}


def test_bleu_by_hand(python_tokens) -> None:
    # 5 candidate words against 6 reference words: 1-grams 4/5, 2-grams 2/4, 3-grams 1/3, 4-grams 0/2;
    # closest reference length 6 > 5 -> brevity penalty exp(1 - 6/5).
    out = caption_metrics({0: "A dog runs on grass."}, {0: ["a dog runs in the grass"]}, metrics=captioning.BLEU)
    bp = math.exp(1 - 6 / 5)
    assert out["BLEU-1"] == pytest.approx(bp * 0.8, rel=1e-6)
    assert out["BLEU-2"] == pytest.approx(bp * math.sqrt(0.8 * 0.5), rel=1e-6)
    assert out["BLEU-3"] == pytest.approx(bp * (0.8 * 0.5 / 3) ** (1 / 3), rel=1e-6)
    assert out["BLEU-4"] < 1e-3  # no 4-gram matches: only pycocoevalcap's 1e-15 smoothing keeps it above 0
    assert list(out.scores) == list(captioning.BLEU)


def test_rouge_l_agrees_with_eval_rouge(python_tokens) -> None:
    out = caption_metrics(CANDIDATES, REFERENCES, metrics=["ROUGE-L"])
    ours = np.mean([rouge_l(CANDIDATES[i], REFERENCES[i]) for i in CANDIDATES])
    assert out["ROUGE-L"] == pytest.approx(ours, rel=1e-12)
    assert list(out.scores) == ["ROUGE-L"]
    assert list(caption_metrics(CANDIDATES, REFERENCES, metrics="ROUGE-L").scores) == ["ROUGE-L"]  # one name


def test_spice_without_corenlp_models_is_unavailable_before_any_java_start(monkeypatch, tmp_path) -> None:
    calls = []

    def no_java(args, *rest, **kw):
        calls.append(args)
        raise captioning._Unavailable("no Java in this test")

    monkeypatch.setattr(captioning, "java_problem", lambda: None)
    monkeypatch.setattr(captioning, "_run_java", no_java)
    monkeypatch.setattr(captioning, "SPICE_CORENLP_JARS", ("no-such-corenlp.jar",))
    out = caption_metrics(CANDIDATES, REFERENCES, metrics=["SPICE", "CIDEr"])
    assert out["SPICE"] is None and out["CIDEr"] > 0
    reason = out.unavailable["SPICE"]
    assert "no-such-corenlp.jar" in reason and "get_stanford_models" in reason
    assert not any("spice" in " ".join(a) for a in calls)  # never started (and never downloads)
    assert "the Java PTBTokenizer failed: no Java in this test" in out.tokenizer  # and the fallback says why


def test_a_failing_java_scorer_is_reported_with_its_reason(monkeypatch) -> None:
    def fail_spice(*args):
        raise captioning._Unavailable("Java exited with status 1: java.lang.OutOfMemoryError")

    monkeypatch.setattr(captioning, "java_problem", lambda: None)
    monkeypatch.setattr(captioning, "_spice", fail_spice)
    monkeypatch.setattr(captioning, "_tokenize", lambda c, *a: ([" ".join(x.lower().split()) for x in c], "test"))
    out = caption_metrics({1: "a dog"}, {1: ["a dog runs"]}, metrics=["SPICE", "BLEU-1"])
    assert out["SPICE"] is None and out.unavailable == {
        "SPICE": "Java exited with status 1: java.lang.OutOfMemoryError"
    }
    assert out["BLEU-1"] == pytest.approx(math.exp(1 - 3 / 2), rel=1e-6)


def test_run_java_reports_the_exception_not_the_stack_frames(tmp_path) -> None:
    if captioning.java_problem() is not None:
        pytest.skip("needs Java")
    with pytest.raises(captioning._Unavailable, match=r"status 1: .*NoSuchMainClass") as err:
        captioning._run_java(["-cp", str(tmp_path), "NoSuchMainClass"], tmp_path, 60)
    assert "\tat " not in str(err.value)


def test_run_java_time_out_and_missing_binary_are_unavailable(monkeypatch, tmp_path) -> None:
    def timeout(*a, **kw):
        raise subprocess.TimeoutExpired("java", 5)

    monkeypatch.setattr(captioning.subprocess, "run", timeout)
    with pytest.raises(captioning._Unavailable, match="within 5 s"):
        captioning._run_java(["-version"], tmp_path, 5)

    def missing(*a, **kw):
        raise FileNotFoundError("java")

    monkeypatch.setattr(captioning.subprocess, "run", missing)
    with pytest.raises(captioning._Unavailable, match="could not start"):
        captioning._run_java(["-version"], tmp_path, 5)


def test_java_detection(monkeypatch) -> None:
    captioning.java_problem.cache_clear()
    try:
        monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
        assert "no `java` on the PATH" in captioning.java_problem()
        captioning.java_problem.cache_clear()
        monkeypatch.setattr(captioning.shutil, "which", lambda name: "/bin/false")  # a java that fails
        assert "`/bin/false -version` failed" in captioning.java_problem()
    finally:
        captioning.java_problem.cache_clear()


def test_java_tokenizer_keeps_one_line_per_caption() -> None:
    if captioning.java_problem() is not None:
        pytest.skip("needs Java")
    root = captioning.pycocoevalcap_dir()
    captions = ["A Dog (brown).", "", "two\nlines here", "...", ""]
    assert captioning._java_ptb_tokenize(captions, root, 60) == [
        "a dog -lrb- brown -rrb-",
        "",
        "two lines here",
        "",
        "",
    ]


def test_without_pycocoevalcap_every_metric_is_unavailable(monkeypatch) -> None:
    monkeypatch.setattr(captioning, "pycocoevalcap_dir", lambda: None)
    out = caption_metrics(CANDIDATES, REFERENCES)
    assert out.scores == dict.fromkeys(COCO_METRICS)
    assert set(out.unavailable) == set(COCO_METRICS) and "vlprompt[caption]" in out.unavailable["CIDEr"]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(DataError, match="same ids"):
        caption_metrics({1: "a"}, {2: ["a"]})
    with pytest.raises(DataError, match="non-empty list"):
        caption_metrics({1: "a"}, {1: []})
    with pytest.raises(DataError, match="non-empty list"):
        caption_metrics({1: "a"}, {1: "a dog"})
    with pytest.raises(DataError, match="must be a string"):
        caption_metrics({1: ["a"]}, {1: ["a"]})
    with pytest.raises(DataError, match="at least one"):
        caption_metrics({}, {})
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_metrics({1: "a"}, {1: ["a"]}, metrics=["BLEU"])


def test_spice_command_input_and_average(monkeypatch) -> None:
    """SPICE's jar is faked (the CoreNLP models are a download): what it is given, and how its output is read."""
    seen = {}

    def fake_java(args, cwd, timeout_s, stdin=None):
        seen["args"] = args
        spice_input = json.loads(Path(args[3]).read_text())
        seen["input"] = spice_input
        f = {0: 0.5, 1: 0.25, 2: "NaN"}  # SPICE writes NaN for a caption without tuples
        out = [{"image_id": item["image_id"], "scores": {"All": {"f": f[item["image_id"]]}}} for item in spice_input]
        Path(args[args.index("-out") + 1]).write_text(json.dumps(out))
        return b""

    monkeypatch.setattr(captioning, "java_problem", lambda: None)
    monkeypatch.setattr(captioning, "_tokenize", lambda c, *a: ([x.lower() for x in c], "test"))
    monkeypatch.setattr(captioning, "SPICE_CORENLP_JARS", ("guava-19.0.jar",))  # a jar that spice/lib holds
    monkeypatch.setattr(captioning, "_run_java", fake_java)
    cands, refs = {"a": "A dog", "b": "A cat"}, {"a": ["A Dog runs", "dogs"], "b": ["a cat"]}
    out = caption_metrics(cands, refs, metrics=["SPICE"])
    assert out["SPICE"] == pytest.approx(0.375) and out.unavailable == {}
    assert seen["input"] == [
        {"image_id": 0, "test": "a dog", "refs": ["a dog runs", "dogs"]},
        {"image_id": 1, "test": "a cat", "refs": ["a cat"]},
    ]
    assert seen["args"][:3] == ["-jar", "-Xmx8G", str(captioning.pycocoevalcap_dir() / "spice/spice-1.0.jar")]
    assert "-cache" not in seen["args"] and "-subset" in seen["args"]
    nan = caption_metrics({**cands, "c": "x"}, {**refs, "c": ["y"]}, metrics=["SPICE"])
    assert math.isnan(nan["SPICE"])  # as pycocoevalcap: the mean over images is NaN, never a silent 0


def test_a_dying_meteor_process_is_unavailable(monkeypatch) -> None:
    from pycocoevalcap.meteor import meteor

    class Dying:
        def compute_score(self, gts, res):
            raise ValueError("could not convert string to float: b''")  # what a dead process's output gives

    monkeypatch.setattr(meteor, "Meteor", Dying)
    monkeypatch.setattr(captioning, "java_problem", lambda: None)
    monkeypatch.setattr(captioning, "_tokenize", lambda c, *a: (c, "test"))
    out = caption_metrics({1: "a dog"}, {1: ["a dog"]}, metrics=["METEOR"])
    assert out["METEOR"] is None and "METEOR's Java process failed" in out.unavailable["METEOR"]

    def no_java(self=None):
        raise FileNotFoundError("java")

    monkeypatch.setattr(meteor, "Meteor", no_java)
    assert "could not start" in caption_metrics({1: "a"}, {1: ["a"]}, metrics=["METEOR"]).unavailable["METEOR"]


def test_a_misaligned_java_tokenizer_output_falls_back_to_python_and_says_why(monkeypatch) -> None:
    monkeypatch.setattr(captioning, "java_problem", lambda: None)
    monkeypatch.setattr(captioning, "_run_java", lambda *a, **kw: b"a dog\nextra\nline")
    out = caption_metrics({1: "A dog."}, {1: ["A dog!"]}, metrics=["BLEU-1"])
    assert "returned 3 lines for 2 captions" in out.tokenizer and out.tokenizer.startswith("ptb-python")
    assert out["BLEU-1"] == pytest.approx(1.0, abs=1e-8)
