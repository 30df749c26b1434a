"""`captioner export --onnx DIR`: the demo models' graphs run under onnxruntime and agree with
PyTorch (features, logits, attention, answers), and a beam search over the exported decoder step
writes PyTorch's captions."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from api.cli import main as cli_main
from captioner.caption.captioner import Captioner
from captioner.caption.search import beam_search, greedy
from captioner.data.shapes import generate_split, render
from captioner.onnx_export import OnnxCaptioner, export_answerer, export_captioner
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import Answerer, encode_questions
from tests.api_fixtures import tiny_vectors_vqa
from tests.conftest import TINY_CAPTIONS, tiny_model

pytestmark = pytest.mark.slow  # five graphs exported once for the module: tens of seconds

SCENES = generate_split(16, seed=11)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert cli_main(["export", "--onnx", str(out)]) == 0  # the demo models by default
    return out


@pytest.fixture(scope="module")
def captioner():
    return Captioner.load(DEFAULT_CAPTION_MODEL)


def _run(folder, name, **feed):
    session = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.ascontiguousarray(v.numpy()) for k, v in feed.items()})


def test_manifests_describe_each_graph_and_the_files_beside_them(exported, captioner):
    folder = exported / "shapes-captioner"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"] == {"name": captioner.name, "version": captioner.version}
    assert manifest["kind"] == "captioner" and manifest["preprocess"]["input_size"] == 64
    vocab = json.loads((folder / manifest["vocab"]).read_text())
    assert vocab == captioner.vocab.to_json()
    step = manifest["graphs"]["decoder_step"]
    assert [i["name"] for i in step["inputs"]] == [
        "memory_features",
        "memory_projected",
        "tokens",
        "h",
        "c",
    ]
    assert step["inputs"][2] == {"name": "tokens", "shape": ["batch", "beams"], "dtype": "int64"}
    assert step["outputs"][0] == {
        "name": "logits",
        "shape": ["batch", "beams", len(captioner.vocab)],
        "dtype": "float32",
    }
    for graph in manifest["graphs"].values():  # the manifest says what the files hold
        session = ort.InferenceSession(str(folder / graph["file"]))
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in graph["inputs"]]
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in graph["outputs"]]
    vqa = json.loads((exported / "shapes-vqa" / "manifest.json").read_text())
    assert vqa["kind"] == "vqa" and set(vqa["graphs"]) == {"encoder", "head"}
    assert (exported / "shapes-vqa" / vqa["answers"]).is_file()


def test_captioner_graphs_agree_with_pytorch(exported, captioner):
    folder = exported / "shapes-captioner"
    pixels = captioner.preprocess([render(s) for s in SCENES[:5]])
    decoder = captioner.model.decoder
    with torch.inference_mode():
        features = captioner.encode(pixels)
        memory = decoder.memory(features)
        (h,), (c,) = decoder.init_state(memory)
    [onnx_features] = _run(folder, "encoder", images=pixels)
    np.testing.assert_allclose(onnx_features, features.numpy(), atol=1e-4, rtol=1e-4)
    grid, projected, pooled, h0, c0 = _run(folder, "decoder_start", features=features)
    np.testing.assert_allclose(projected, memory.projected.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(h0[0], h.numpy(), atol=1e-5)
    # One step for 3 beams per image, from different states and words.
    torch.manual_seed(0)
    tokens = torch.randint(4, len(captioner.vocab), (5, 3))
    hs, cs = torch.randn(1, 5, 3, 256), torch.randn(1, 5, 3, 256)
    logits, alpha, h1, c1 = _run(
        folder,
        "decoder_step",
        memory_features=memory.features,
        memory_projected=memory.projected,
        tokens=tokens,
        h=hs,
        c=cs,
    )
    with torch.inference_mode():
        want_logits, want_alpha, (want_h, want_c) = decoder.step(
            memory, ([hs[0].reshape(15, -1)], [cs[0].reshape(15, -1)]), tokens.reshape(15)
        )
    np.testing.assert_allclose(logits.reshape(15, -1), want_logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(alpha.reshape(15, -1), want_alpha.numpy(), atol=1e-5)
    np.testing.assert_allclose(c1.reshape(15, -1), want_c[0].numpy(), atol=1e-5)


def test_beam_search_over_the_onnx_step_writes_pytorchs_captions(exported, captioner):
    onnx_captioner = OnnxCaptioner(exported / "shapes-captioner")
    pixels = captioner.preprocess([render(s) for s in SCENES])
    want = [r.caption for r in captioner.caption([render(s) for s in SCENES], beam_size=3)]
    got = [captioner.vocab.decode(h.tokens) for h in onnx_captioner.search(pixels, 3)]
    assert got == want
    features = onnx_captioner.encode(pixels)
    for a, b in zip(
        greedy(onnx_captioner.decoder, features, 20),
        [h[0] for h in beam_search(captioner.model.decoder, captioner.encode(pixels), 1)],
    ):
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=1e-4)


def test_vqa_graphs_agree_with_pytorch(exported):
    answerer = Answerer.load(DEFAULT_VQA_MODEL)
    folder = exported / "shapes-vqa"
    scenes = SCENES[:6]
    pixels = answerer.preprocess([render(s) for s in scenes])
    questions = [s.questions[i % len(s.questions)].question for i, s in enumerate(scenes)]
    ids = encode_questions(questions, answerer.question_vocab)
    memory = answerer.encode(pixels)
    [onnx_memory] = _run(folder, "encoder", images=pixels)
    np.testing.assert_allclose(onnx_memory, memory.numpy(), atol=1e-4, rtol=1e-4)
    logits, alpha = _run(folder, "head", memory=memory, questions=ids)
    with torch.inference_mode():
        want_logits, want_alpha = answerer.model.head_prepared(memory, ids)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(alpha, want_alpha.numpy(), atol=1e-5)
    answers = [answerer.answers[i] for i in logits.argmax(1)]
    assert answers == [r.answer for r in answerer.answer_features(memory, questions)]


def test_a_bidirectional_vqa_model_with_word_vectors_exports(tmp_path):
    """The right-to-left pass reverses each question in place: under ONNX too, for questions of
    every length, padded or not, and for words only the vectors gave (not `<unk>`)."""
    answerer = tiny_vectors_vqa()
    folder = export_answerer(answerer, tmp_path / "bilstm")
    questions = ["what color is the circle?", "is the zebra a ball?", "hue", "how many shapes?"]
    ids = encode_questions(questions, answerer.question_vocab)  # (4, 6), right-padded
    assert (ids == 0).any() and answerer.question_vocab.unk_id not in ids[1].tolist()
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    memory = answerer.encode(pixels)
    [onnx_memory] = _run(folder, "encoder", images=pixels)
    np.testing.assert_allclose(onnx_memory, memory.numpy(), atol=1e-5, rtol=1e-5)
    logits, alpha = _run(folder, "head", memory=memory, questions=ids)
    with torch.inference_mode():
        want_logits, want_alpha = answerer.model.head_prepared(memory, ids)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(alpha, want_alpha.numpy(), atol=1e-6)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["vqa"]["bidirectional"] and manifest["vqa"]["embed_dim"] == 6


@pytest.mark.parametrize(
    "options",
    [
        dict(preview_steps=2),
        dict(attention_mass=True),
        dict(similarity_mass=True),
        dict(refine_layers=1, positional=True),
    ],
    ids=["preview", "mass", "similar", "refine"],
)
def test_a_captioner_with_decoder_options_exports(tmp_path, options):
    """Preview steps and refine layers are part of the start graph, the attention and
    similarity masses part of the step graph: the ONNX search writes PyTorch's captions."""
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=4, **options).eval()
    with torch.no_grad():
        net.decoder.out.weight.mul_(5.0)
    captioner = Captioner(net, vocab, name="options")
    folder = export_captioner(captioner, tmp_path / "options")
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    onnx_captioner = OnnxCaptioner(folder)
    for beam in (1, 3):
        want = [h[0].tokens for h in beam_search(net.decoder, captioner.encode(pixels), beam, 12)]
        assert [h.tokens for h in onnx_captioner.search(pixels, beam, 12)] == want


def test_a_quantized_captioner_is_not_exported(tmp_path):
    with pytest.raises(ValueError, match="float"):
        export_captioner(Captioner.load(DEFAULT_CAPTION_MODEL, quantize="int8"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_of_a_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    argv = ["export", "--onnx", str(tmp_path / "out"), "--caption-model", str(tmp_path / "none")]
    assert cli_main([*argv, "--vqa-model", ""]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
