import json

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
