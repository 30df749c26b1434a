import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from api.cli import main
from tests.test_checkpoint import _images


def test_caption_prints_one_json_object_per_image(tmp_path, captioner, capsys):
    captioner.save(tmp_path / "m")
    paths = []
    for i, image in enumerate(_images(3)):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    assert (
        main(
            [
                "caption",
                *paths,
                "--model",
                str(tmp_path / "m"),
                "--beam-size",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["image"] for line in lines] == paths
    expected = captioner.caption(paths, beam_size=2)
    assert [json.loads(line)["caption"] for line in lines] == [r.caption for r in expected]
    assert json.loads(lines[0])["attention"] is None


def test_unreadable_image_is_reported_and_others_still_captioned(tmp_path, captioner, capsys):
    captioner.save(tmp_path / "m")
    _images(1)[0].save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("hello")
    code = main(
        [
            "caption",
            str(tmp_path / "bad.png"),
            str(tmp_path / "ok.png"),
            "--model",
            str(tmp_path / "m"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "bad.png" in err
    assert json.loads(out)["image"].endswith("ok.png")


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["caption", "x.png", "--model", str(tmp_path / "none")]) == 2
    assert "model folder not found" in capsys.readouterr().err


def assert_same_json(a, b, path="$"):
    """The same JSON, but for the last bits of floats (the service decodes in a worker thread,
    and on a loaded machine two runs of one model have differed by 2e-7) and, as a consequence,
    a level or so of the 8-bit PNG overlays."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_json(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_json(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    elif isinstance(a, str) and path.startswith("$.attention.overlays"):
        pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(x))), float) for x in (a, b)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 2, path
    else:
        assert a == b, path


def test_the_cli_prints_what_the_api_returns(tmp_path, capsys):
    """One serialiser per result: `captioner caption`/`ask` print the HTTP API's JSON, plus the
    image's path, for the same request."""
    from api.app import create_app
    from tests.api_fixtures import TestClient, png, save_tiny_captioner, save_tiny_vqa, settings

    cap, vqa = save_tiny_captioner(tmp_path / "cap"), save_tiny_vqa(tmp_path / "vqa", glimpses=2)
    image = tmp_path / "scene.png"
    image.write_bytes(png(3))
    question = "what color is the circle?"
    with TestClient(create_app(settings(caption_model=cap, vqa_model=vqa))) as client:
        for fmt in ("grid", "png", "none"):
            files = {"image": ("scene.png", image.read_bytes(), "image/png")}
            api = client.post(f"/caption?attention={fmt}&beam_size=2", files=files).json()
            assert main(["caption", str(image), "--model", str(cap), "--beam-size", "2",
                         "--attention", fmt]) == 0  # fmt: skip
            printed = json.loads(capsys.readouterr().out)
            assert printed.pop("image") == str(image)
            assert_same_json(printed, api)
            assert (api["attention"] is None) == (fmt == "none")

            data = {"question": question}
            api = client.post(f"/vqa?attention={fmt}&top_k=2", files=files, data=data).json()
            assert main(["ask", str(image), question, "--model", str(vqa), "--top-k", "2",
                         "--attention", fmt]) == 0  # fmt: skip
            printed = json.loads(capsys.readouterr().out)
            assert printed.pop("image") == str(image)
            assert_same_json(printed, api)
            assert len(api["top_answers"]) == 2


def test_caption_and_ask_print_finished_and_unknown_words(tmp_path, vocab, capsys):
    from captioner.caption.captioner import Captioner
    from tests.api_fixtures import png, save_tiny_vqa
    from tests.conftest import scripted_model

    model = scripted_model(vocab, ["two", "green", "triangles"])
    Captioner(model, vocab, name="scripted").save(tmp_path / "cap")
    image = tmp_path / "scene.png"
    image.write_bytes(png(3))
    for max_length, finished in (("20", True), ("3", False)):
        argv = ["caption", str(image), "--model", str(tmp_path / "cap"), "--max-length", max_length]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["finished"] is finished

    vqa = save_tiny_vqa(tmp_path / "vqa")
    for question, unknown, known in (
        ("what color is the circle?", [], True),
        ("what color is the zebra?", ["zebra"], True),
        ("is the zebra next to the refrigerator?", ["zebra", "next", "to", "refrigerator"], False),
    ):
        assert main(["ask", str(image), question, "--model", str(vqa)]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["unknown_words"], printed["known_content_words"]) == (unknown, known)


def test_the_demo_models_json_says_whether_each_image_is_in_domain(tmp_path, capsys):
    from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL
    from tests.api_fixtures import coco_photo, scene_png

    scene, photo = tmp_path / "scene.png", tmp_path / "photo.jpg"
    scene.write_bytes(scene_png(5))
    photo.write_bytes(coco_photo(2))
    assert main(["caption", str(scene), str(photo), "--model", str(DEFAULT_CAPTION_MODEL)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["image"], line["in_domain"]) for line in lines] == [
        (str(scene), True),
        (str(photo), False),
    ]
    assert all(isinstance(line["domain_score"], float) for line in lines)
    assert main(["ask", str(photo), "what color is it?", "--model", str(DEFAULT_VQA_MODEL)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["in_domain"] is False and answer["domain_score"] > 1.5
