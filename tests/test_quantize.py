"""`quantize="int8"`: the demo models load with int8 LSTM and linear layers and answer nearly as
the float ones; the CLI flag and the service setting reach them; bad values are clear errors."""

import io
import json

import pytest
import torch
from torch import nn

from api.app import create_app
from api.cli import main as cli_main
from captioner.caption.captioner import Captioner
from captioner.data.shapes import generate_split, render
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL
from captioner.quantize import quantize_model
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import Answerer
from tests.api_fixtures import TestClient, settings, tiny_vectors_vqa
from tests.conftest import TINY_CAPTIONS, tiny_model

SCENES = generate_split(24, seed=11)  # not the demo models' training seed


def _float_layers(model: nn.Module) -> list[str]:
    kinds = (nn.Linear, nn.LSTMCell, nn.LSTM, nn.GRUCell, nn.GRU, nn.RNNCell)
    return [name for name, m in model.named_modules() if type(m) in kinds]


@pytest.fixture(scope="module")
def images():
    return [render(scene) for scene in SCENES]


def test_int8_captioner_writes_nearly_the_float_captions(images):
    plain = Captioner.load(DEFAULT_CAPTION_MODEL)
    int8 = Captioner.load(DEFAULT_CAPTION_MODEL, quantize="int8")
    assert _float_layers(plain.model.decoder)
    # Only the refine layers (self-attention over the grid, once per image) stay in float.
    assert all(name.startswith("refine.") for name in _float_layers(int8.model.decoder))
    assert int8.quantize == "int8" and plain.quantize is None
    want = plain.caption(images, beam_size=3)
    got = int8.caption(images, beam_size=3)
    same = [r.caption == w.caption for r, w in zip(got, want, strict=True)]
    assert sum(same) >= 20, [(r.caption, w.caption) for r, w in zip(got, want) if r != w]
    # The weights changed: the log-probabilities of a same caption are close, not equal.
    i = same.index(True)
    assert got[i].token_logprobs != want[i].token_logprobs
    assert got[i].token_logprobs == pytest.approx(want[i].token_logprobs, abs=0.05)


def test_a_captioner_with_refine_layers_quantizes_all_but_them(tmp_path):
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=4, refine_layers=1).eval()
    with torch.no_grad():
        net.decoder.out.weight.mul_(5.0)
    folder = Captioner(net, vocab, name="refine").save(tmp_path / "refine")
    plain = Captioner.load(folder)
    int8 = Captioner.load(folder, quantize="int8")
    layers = _float_layers(int8.model.decoder)
    assert layers == ["refine.layers.0.linear1", "refine.layers.0.linear2"]
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        memory = int8.model.decoder.memory(int8.encode(pixels)).features
        torch.testing.assert_close(
            memory, plain.model.decoder.memory(plain.encode(pixels)).features
        )
    # The int8 words come out of the float memory: first-step log-probabilities stay close.
    first = {}
    for name, captioner in (("float", plain), ("int8", int8)):
        [result] = captioner.caption_features(captioner.encode(pixels[:1]), method="greedy")
        first[name] = result.token_logprobs[0]
    assert first["int8"] == pytest.approx(first["float"], abs=0.05)


def test_int8_answerer_gives_nearly_the_float_answers(images):
    questions = [s.questions[i % len(s.questions)].question for i, s in enumerate(SCENES)]
    plain = Answerer.load(DEFAULT_VQA_MODEL)
    int8 = Answerer.load(DEFAULT_VQA_MODEL, quantize="int8")
    # All but the glimpse scores and the classifier's first layer (see INT8_KEEP_FLOAT).
    assert _float_layers(int8.model) == ["attend.score", "classifier.1"]
    want = [r.answer for r in plain.answer(images, questions)]
    got = [r.answer for r in int8.answer(images, questions)]
    assert sum(a == b for a, b in zip(got, want, strict=True)) >= 22, (got, want)


def test_int8_bidirectional_vqa_model_with_word_vectors_answers_as_the_float_one(tmp_path):
    folder = tiny_vectors_vqa().save(tmp_path / "bilstm")
    plain = Answerer.load(folder)
    int8 = Answerer.load(folder, quantize="int8")
    assert _float_layers(plain.model.question) == ["rnn", "rnn_back"]
    assert _float_layers(int8.model) == ["attend.score", "classifier.1"]  # both directions int8
    questions = ["what color is the circle?", "is the zebra a ball?", "hue", "is there a square?"]
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = plain.answer_features(plain.encode(pixels), questions, top_k=7)
    got = int8.answer_features(int8.encode(pixels), questions, top_k=7)
    for g, w in zip(got, want, strict=True):
        assert g.unknown_words == w.unknown_words
        assert dict(g.top_answers) == pytest.approx(dict(w.top_answers), abs=2e-3)


def test_a_quantized_model_is_not_saved_and_bad_values_are_clear_errors(tmp_path):
    int8 = Captioner.load(DEFAULT_CAPTION_MODEL, quantize="int8")
    with pytest.raises(ValueError, match="cannot be saved"):
        int8.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="'int4'"):
        Captioner.load(DEFAULT_CAPTION_MODEL, quantize="int4")
    with pytest.raises(ValueError, match="CPU only"):
        Answerer.load(DEFAULT_VQA_MODEL, device="cuda", quantize="int8")
    assert quantize_model(int8.model, None) is int8.model


def test_cli_quantize_flag_prints_the_int8_captions_and_answers(tmp_path, images, capsys):
    images[0].save(tmp_path / "a.png")
    path = str(tmp_path / "a.png")
    assert cli_main(["caption", path, "--quantize", "int8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    [want] = Captioner.load(DEFAULT_CAPTION_MODEL, quantize="int8").caption([path])
    assert printed["caption"] == want.caption
    assert printed["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-6)
    question = SCENES[0].questions[0].question
    assert cli_main(["ask", path, question, "--quantize", "int8", "--top-k", "2"]) == 0
    answer = json.loads(capsys.readouterr().out)
    [want] = Answerer.load(DEFAULT_VQA_MODEL, quantize="int8").answer([path], [question], 2)
    assert answer["answer"] == want.answer
    assert answer["confidence"] == pytest.approx(want.confidence, abs=1e-6)


def test_the_service_loads_int8_models_when_quantize_is_set(images):
    app = create_app(settings(caption_model=DEFAULT_CAPTION_MODEL, quantize="int8"))
    buf = io.BytesIO()
    images[1].save(buf, format="PNG")
    with TestClient(app) as client:
        assert app.state.services["captioner"].model.quantize == "int8"
        response = client.post("/caption", files={"image": ("a.png", buf.getvalue())})
    assert response.status_code == 200
    [want] = Captioner.load(DEFAULT_CAPTION_MODEL, quantize="int8").caption([buf.getvalue()])
    assert response.json()["caption"] == want.caption
    torch.testing.assert_close(
        torch.tensor(response.json()["token_logprobs"]), torch.tensor(want.token_logprobs)
    )


def test_cli_fuse_attention_flag_prints_the_same_caption_and_refuses_int8(tmp_path, images, capsys):
    images[0].save(tmp_path / "a.png")
    path = str(tmp_path / "a.png")
    assert cli_main(["caption", path]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert cli_main(["caption", path, "--fuse-attention"]) == 0
    fused = json.loads(capsys.readouterr().out)
    assert fused["caption"] == eager["caption"]
    assert fused["token_logprobs"] == pytest.approx(eager["token_logprobs"], abs=1e-5)
    assert cli_main(["caption", path, "--fuse-attention", "--quantize", "int8"]) == 2
    assert "fuse_attention works on float weights" in capsys.readouterr().err
