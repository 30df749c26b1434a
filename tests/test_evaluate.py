"""training.evaluate end to end on a tiny shapes split and tiny captioners."""

from __future__ import annotations

import json

import pytest

from captioner.caption.captioner import Captioner
from captioner.data.shapes import generate_split
from captioner.vocab import Vocabulary
from tests.conftest import assert_umask_modes, tiny_model
from training import evaluate
from training.make_shapes import write_split

KEYS = {
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "ref_loo_Bleu_4",
    "ref_loo_CIDEr",
    "grounding",
    "grounding_uniform",
    "grounded_words",
    "object_accuracy",
    "scene_accuracy",
    "relation_accuracy",
    "relation_scenes",
    "invented_relations",
    "unclear_relation_scenes",
    "count_accuracy",
    "count_scenes",
    "n_images",
    "beam_size",
    "max_length",
    "model",
    "data",
    "skipped_missing_images",
    "skipped_unreadable_images",
    "notes",
    "seconds",
}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """5 shapes scenes of 32 px, one image deleted and one damaged; two tiny captioners."""
    root = tmp_path_factory.mktemp("evaluate")
    scenes = generate_split(5, seed=3, size=32)
    write_split(scenes, root / "test", split="test", progress=False)
    (root / "test" / "images" / scenes[3].file_name).unlink()
    (root / "test" / "images" / scenes[4].file_name).write_bytes(b"not a png")
    vocab = Vocabulary.build(c for s in scenes for c in s.captions)
    Captioner(tiny_model(len(vocab)), vocab, name="tiny", version="2").save(root / "attn")
    plain = tiny_model(len(vocab), attention=False)
    Captioner(plain, vocab, name="plain", version="1").save(root / "plain")
    return root, scenes


def _args(root, model: str, *extra: str):
    test = root / "test"
    argv = ["--model", str(root / model), "--captions", str(test / "captions.json")]
    argv += ["--images", str(test / "images"), "--out", str(root / f"{model}.json")]
    argv += ["--objects", str(test / "objects.json"), "--no-java", "--no-progress", *extra]
    return evaluate.get_args_parser().parse_args(argv)


def test_writes_every_metric_and_coco_results(split, capsys):
    root, scenes = split
    results = root / "results.json"
    returned = evaluate.main(_args(root, "attn", "--results", str(results), "--beam-size", "2"))
    metrics = json.loads((root / "attn.json").read_text())
    assert metrics == returned
    assert set(metrics) == KEYS
    assert metrics["n_images"] == 3  # 5 scenes, one image missing, one not decodable
    assert metrics["skipped_missing_images"] == 1 and metrics["skipped_unreadable_images"] == 1
    assert metrics["beam_size"] == 2
    assert metrics["model"]["name"] == "tiny" and metrics["model"]["version"] == "2"
    assert metrics["METEOR"] is None and "SPICE" in metrics["notes"]
    for key in ("Bleu_4", "CIDEr", "ROUGE_L", "object_accuracy", "scene_accuracy"):
        assert isinstance(metrics[key], float) and metrics[key] >= 0
    assert 0 < metrics["ref_loo_Bleu_4"] < 1 and metrics["ref_loo_CIDEr"] > 0
    assert metrics["grounded_words"] > 0  # this untrained model says "crosses" (a shape word)
    assert 0 <= metrics["grounding"] <= 1 and 0 < metrics["grounding_uniform"] < 1

    coco = json.loads(results.read_text())
    assert [r["image_id"] for r in coco] == [s.image_id for s in scenes[:3]]
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in coco)
    err = capsys.readouterr().err
    assert "SPICE skipped" in err and "unreadable" in err


def test_metrics_and_results_get_the_modes_the_umask_implies(split, tmp_path, umask):
    root, _ = split
    out = tmp_path / "eval"  # created by the writer
    args = ("--out", str(out / "METRICS.json"), "--results", str(out / "results.json"))
    evaluate.main(_args(root, "plain", *args))
    assert sorted(p.name for p in out.iterdir()) == ["METRICS.json", "results.json"]
    assert_umask_modes(umask, out)


def test_model_without_attention_has_null_grounding(split):
    root, _ = split
    metrics = evaluate.main(_args(root, "plain", "--limit", "1"))
    assert metrics["n_images"] == 1
    assert metrics["grounding"] is None and metrics["grounding_uniform"] is None
    assert metrics["object_accuracy"] is not None


def test_bad_arguments_are_value_errors(split, tmp_path):
    root, _ = split
    with pytest.raises(ValueError, match="limit"):
        evaluate.main(_args(root, "attn", "--limit", "0"))
    with pytest.raises(ValueError, match="objects file not found"):
        evaluate.main(_args(root, "attn", "--objects", str(tmp_path / "none.json")))


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--captions", "--images", "--out", "--beam-size", "--objects"):
        assert flag in out
