"""`Answerer`: model folders, batched vs single answers, the feature cache, metadata and `ask`."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from api.cli import main as cli_main
from captioner.checkpoint import ModelDirError
from captioner.domain import DomainStats
from captioner.image import UnreadableImageError
from captioner.results import AnswerResult
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import Answerer
from tests.test_vqa_net import QUESTIONS, tiny_vqa

ANSWERS = ["red", "blue", "circle", "square", "yes", "no", "2"]


def make_model(**kwargs) -> Answerer:
    vocab = Vocabulary.build(QUESTIONS)
    net = tiny_vqa(len(vocab), len(ANSWERS), **kwargs)
    return Answerer(net, vocab, ANSWERS, name="tiny-vqa", version="3")


def png(color: tuple[int, int, int], size: int = 40) -> bytes:
    image = Image.new("RGB", (size, size), (20, 20, 20))
    image.paste(color, (5, 5, 25, 25))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images() -> list[bytes]:
    return [png((220, 40, 40)), png((40, 40, 220)), png((240, 220, 40)), png((200, 200, 200))]


def test_batched_answers_equal_one_at_a_time(images):
    vqa = make_model(glimpses=2, coords=True)
    questions = QUESTIONS[:4]
    batched = vqa.answer(images, questions, top_k=3)
    single = [vqa.answer([im], [q], top_k=3)[0] for im, q in zip(images, questions)]
    for b, s in zip(batched, single):
        assert b.answer == s.answer
        assert [a for a, _ in b.top_answers] == [a for a, _ in s.top_answers]
        np.testing.assert_allclose(
            [p for _, p in b.top_answers], [p for _, p in s.top_answers], atol=1e-5
        )
        np.testing.assert_allclose(b.attention, s.attention, atol=1e-6)


def test_result_fields_and_attention_maps(images):
    vqa = make_model(glimpses=2)
    [result] = vqa.answer([images[0]], ["what color is the circle?"], top_k=3)
    assert isinstance(result, AnswerResult)
    assert (
        result.answer == result.top_answers[0][0] and result.confidence == result.top_answers[0][1]
    )
    probs = [p for _, p in result.top_answers]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert result.attention.shape == (2, *vqa.grid_hw)
    np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), [1.0, 1.0], atol=1e-5)
    d = result.to_dict()
    assert d["top_answers"][0] == {"answer": result.answer, "probability": result.confidence}
    assert d["attention"]["height"] == 4 and len(d["attention"]["maps"]) == 2
    assert result.to_dict(attention="none")["attention"] is None
    assert d["question"] == "what color is the circle?" and d["model"] == {
        "name": vqa.name,
        "version": vqa.version,
    }


def test_top_k_is_capped_by_the_answer_count_and_must_be_positive(images):
    vqa = make_model()
    [result] = vqa.answer([images[0]], ["what shape is the red object?"], top_k=50)
    assert len(result.top_answers) == len(ANSWERS)
    with pytest.raises(ValueError, match="top_k"):
        vqa.answer([images[0]], ["what shape is the red object?"], top_k=0)


def test_baseline_returns_no_attention(images):
    vqa = make_model(attention=False)
    [result] = vqa.answer([images[0]], ["is there a blue triangle?"])
    assert result.attention is None
    assert vqa.metadata()["attention_grid"] is None


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, images):
    vqa = make_model(glimpses=2, stacked=True, coords=True, count=True, positional=True)
    with torch.no_grad():  # make the zero-initialised position embedding matter
        vqa.model.position.normal_()
    path = vqa.save(tmp_path / "m", training={"data": {"train": "x"}, "metrics": {"accuracy": 0.5}})
    assert sorted(p.name for p in path.iterdir()) == [
        "answers.json", "card.json", "config.json", "model.safetensors", "question_vocab.json",
        "training.json"
    ]  # fmt: skip
    assert json.loads((path / "config.json").read_text())["kind"] == "vqa"
    loaded = Answerer.load(path)
    assert (loaded.name, loaded.version, loaded.answers) == ("tiny-vqa", "3", ANSWERS)
    a = vqa.answer(images, QUESTIONS[:4], top_k=7)
    b = loaded.answer(images, QUESTIONS[:4], top_k=7)
    for x, y in zip(a, b):
        assert x.top_answers == y.top_answers
        np.testing.assert_array_equal(x.attention, y.attention)
    assert loaded.metadata()["metrics"] == {"accuracy": 0.5}


def test_load_refuses_a_captioner_folder_and_mismatched_weights(tmp_path):
    from tests.api_fixtures import save_tiny_captioner

    with pytest.raises(ModelDirError, match="answers.json|expected 'vqa'"):
        Answerer.load(save_tiny_captioner(tmp_path / "cap"))
    path = make_model(glimpses=2).save(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["vqa"]["glimpses"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="do not match"):
        Answerer.load(path)


def test_same_image_bytes_five_times_encode_once(images):
    vqa = make_model()
    calls = []
    vqa.model.encoder.register_forward_hook(lambda m, inputs, out: calls.append(len(inputs[0])))
    for q in QUESTIONS:
        vqa.answer([images[0]], [q])
    assert calls == [1]
    assert (vqa.cache.misses, vqa.cache.hits) == (1, 4)
    vqa.answer([images[1]] * 5, QUESTIONS)  # five copies in one call: one encoding too
    assert calls == [1, 1]


def test_the_domain_score_is_computed_at_encoding_and_cached_with_the_image(images):
    vqa = make_model()
    assert vqa.answer([images[0]], [QUESTIONS[0]])[0].domain_score is None  # no statistics
    with torch.inference_mode():
        pooled = vqa.model.encoder(vqa.preprocess(images))[1]  # (4, D)
    vqa.domain = DomainStats.fit(pooled[:3], pooled[3:], "dark squares", quantile=1.0)
    calls = []
    vqa.model.encoder.register_forward_hook(lambda m, inputs, out: calls.append(len(inputs[0])))
    first = vqa.answer(images[:2], QUESTIONS[:2])
    again = vqa.answer([images[1], images[0]], QUESTIONS[2:4])  # both from the cache
    assert calls == [2] and vqa.cache.hits == 2
    assert [r.domain_score for r in again] == [first[1].domain_score, first[0].domain_score]
    _, scores = vqa.encode_scored(vqa.preprocess(images[:2]))
    np.testing.assert_allclose([r.domain_score for r in first], scores, rtol=1e-6)
    assert [r.in_domain for r in first] == [s <= vqa.domain.threshold for s in scores]
    # Several questions about rows of a batch: each answer carries its own image's score.
    memory, scores = vqa.image_memory([None, None], lambda i: vqa.preprocess(images[i : i + 1])[0])
    several = vqa.answer_features(
        memory, QUESTIONS[:3], image_index=[1, 0, 1], domain_scores=scores
    )
    assert [r.domain_score for r in several] == [scores[1], scores[0], scores[1]]
    with pytest.raises(ValueError, match="3 domain scores for 2 images"):
        vqa.answer_features(memory, QUESTIONS[:2], domain_scores=[1.0, 2.0, 3.0])


def test_paths_are_cached_by_content_and_pil_images_bypass_the_cache(tmp_path, images):
    vqa = make_model()
    calls = []
    vqa.model.encoder.register_forward_hook(lambda m, inputs, out: calls.append(len(inputs[0])))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(images[2])
    b.write_bytes(images[2])  # another name, same bytes: same features
    first = vqa.answer([a], ["what color is the circle?"])[0]
    second = vqa.answer([b], ["what color is the circle?"])[0]
    assert calls == [1] and first.top_answers == second.top_answers
    pil = Image.open(io.BytesIO(images[2]))
    third = vqa.answer([pil], ["what color is the circle?"])[0]
    assert calls == [1, 1]
    np.testing.assert_allclose(third.confidence, first.confidence, atol=1e-6)


def test_bad_inputs_are_value_errors(tmp_path, images):
    vqa = make_model()
    with pytest.raises(ValueError, match="2 images for 1 questions"):
        vqa.answer(images[:2], ["what?"])
    with pytest.raises(UnreadableImageError, match="missing.png"):
        vqa.answer([tmp_path / "missing.png"], ["what color?"])
    with pytest.raises(UnreadableImageError):
        vqa.answer([b"not an image"], ["what color?"])
    with pytest.raises(ValueError, match="has no words"):
        vqa.answer([images[0]], [" "])
    assert vqa.answer([], []) == []


def test_unknown_words_map_to_unk(images):
    vqa = make_model()
    [known] = vqa.answer([images[0]], ["what color is the circle?"])
    [unknown] = vqa.answer([images[0]], ["what colour is the circle?"])  # "colour" is not in it
    assert len(unknown.top_answers) == 3 and unknown.top_answers != known.top_answers


def test_metadata_describes_the_model():
    vqa = make_model(glimpses=2, cell="gru")
    meta = vqa.metadata()
    assert meta["kind"] == "vqa" and meta["name"] == "tiny-vqa" and meta["version"] == "3"
    assert meta["encoder"] == "small_cnn" and meta["question_encoder"] == "gru"
    assert meta["attention"] is True and meta["attention_grid"] == [4, 4] and meta["glimpses"] == 2
    assert meta["num_answers"] == len(ANSWERS)
    assert meta["vocabulary_size"] == len(vqa.question_vocab)
    assert vqa.input_size == 32 and vqa.grid_hw == (4, 4)


def test_preprocess_and_encode_match_answer(images):
    vqa = make_model()
    feats = vqa.encode(vqa.preprocess(images[:2]))
    assert feats.shape == (2, 16, 16 + 10)  # grid features and their attention projection
    direct = vqa.answer_features(feats, QUESTIONS[:2], top_k=2)
    through = vqa.answer(images[:2], QUESTIONS[:2], top_k=2)
    assert [r.top_answers for r in direct] == [r.top_answers for r in through]


def test_cli_ask_prints_the_answer_as_json(tmp_path, images, capsys):
    path = make_model(glimpses=2).save(tmp_path / "m")
    image = tmp_path / "scene.png"
    image.write_bytes(images[0])
    argv = ["ask", str(image), "what color is the circle?", "--model", str(path), "--top-k", "2"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image"] == str(image) and out["question"] == "what color is the circle?"
    assert out["model"] == {"name": "tiny-vqa", "version": "3"}
    assert len(out["top_answers"]) == 2 and out["answer"] == out["top_answers"][0]["answer"]
    assert out["attention"]["height"] == 4
    json.dumps(out)


def test_unknown_words_are_listed_and_a_question_without_known_content_is_flagged(images):
    vqa = make_model()
    known, partly, unknown = vqa.answer(
        images[:3],
        [
            "what color is the circle?",
            "what color is the zebra by the Zebra?",
            "is the zebra next to the refrigerator?",
        ],
    )
    assert (known.unknown_words, known.known_content_words) == ([], True)
    assert (partly.unknown_words, partly.known_content_words) == (["zebra", "by"], True)
    # Still answered, and flagged: the model sees only "is the <unk> <unk> to the <unk>".
    assert unknown.unknown_words == ["zebra", "next", "refrigerator"]
    assert unknown.known_content_words is False and unknown.answer in ANSWERS
    d = unknown.to_dict()
    assert d["unknown_words"] == ["zebra", "next", "refrigerator"]
    assert d["known_content_words"] is False
