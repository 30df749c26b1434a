"""`python -m training.domain_stats`: domain statistics added to an existing model folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from captioner.caption.captioner import Captioner
from captioner.checkpoint import ModelDirError
from captioner.data.images import ImageTensors, list_images
from captioner.data.shapes import generate_split, render
from captioner.domain import DOMAIN_JSON, DOMAIN_TENSORS, DomainStats
from captioner.vqa.answerer import Answerer
from tests.api_fixtures import save_tiny_captioner, save_tiny_vqa
from tests.conftest import ROOT
from training import domain_stats


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two folders of shapes scenes: 30 to fit, 10 to hold out."""
    root = tmp_path_factory.mktemp("scenes")
    for name, count, seed in (("fit", 30, 1), ("held", 10, 2)):
        (root / name).mkdir()
        for scene in generate_split(count, seed, size=64):
            render(scene).save(root / name / scene.file_name)
    return root


def _run(*argv: str) -> dict:
    argv = [*argv, "--no-progress"]
    return domain_stats.main(domain_stats.get_args_parser().parse_args(argv), argv)


def _pooled(model, folder) -> torch.Tensor:
    images = ImageTensors(list_images(folder), model.input_size)
    with torch.inference_mode():
        return model.model.encoder.eval()(images.batch(range(len(images))))[1]


def test_adds_statistics_of_the_images_and_a_threshold_from_the_holdout(tmp_path, scenes, capsys):
    folder = save_tiny_captioner(tmp_path / "cap")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    record = _run("--model", str(folder), "--images", str(scenes / "fit"), "--holdout",
                  str(scenes / "held"), "--description", "tiny shapes scenes", "--quantile", "0.9")  # fmt: skip
    assert json.loads(capsys.readouterr().out) == record
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(after) == set(before) | {DOMAIN_JSON, DOMAIN_TENSORS}
    assert all(after[name] == data for name, data in before.items())  # the rest untouched

    loaded = Captioner.load(folder)
    expected = DomainStats.fit(
        _pooled(loaded, scenes / "fit"), _pooled(loaded, scenes / "held"), "x", quantile=0.9
    )
    torch.testing.assert_close(loaded.domain.mean, expected.mean)
    assert loaded.domain.threshold == pytest.approx(expected.threshold, rel=1e-5)
    assert loaded.domain.description == record["description"] == "tiny shapes scenes"
    assert (record["fit_images"], record["holdout_images"]) == (30, 10)
    assert record["command"].startswith("python -m training.domain_stats --model")


def test_without_holdout_a_share_of_the_images_sets_the_threshold_and_vqa_works(tmp_path, scenes):
    folder = save_tiny_vqa(tmp_path / "vqa")
    record = _run("--model", str(folder), "--images", str(scenes / "fit"), "--description", "s",
                  "--holdout-share", "0.3")  # fmt: skip
    assert (record["fit_images"], record["holdout_images"]) == (21, 9)
    vqa = Answerer.load(folder)
    [answer] = vqa.answer([scenes / "held" / "000000000001.png"], ["is there a square?"])
    assert isinstance(answer.domain_score, float) and isinstance(answer.in_domain, bool)

    _run("--model", str(folder), "--images", str(scenes / "held"), "--description", "again")
    assert Answerer.load(folder).domain.description == "again"  # replaced, not added beside
    assert [p.name for p in tmp_path.iterdir()] == ["vqa"]  # no temporary sibling left


def test_bad_input_is_refused_naming_it(tmp_path, scenes):
    folder = save_tiny_captioner(tmp_path / "cap")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        _run("--model", str(folder), "--images", str(tmp_path / "empty"), "--description", "x")
    with pytest.raises(ModelDirError, match="cannot read the model kind"):
        _run("--model", str(tmp_path), "--images", str(scenes / "fit"), "--description", "x")
    with pytest.raises(ValueError, match="description must be a non-empty string"):
        _run("--model", str(folder), "--images", str(scenes / "fit"), "--description", " ")
    assert not (folder / DOMAIN_JSON).exists()


def test_help():
    proc = subprocess.run(
        [sys.executable, "-m", "training.domain_stats", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and "--holdout" in proc.stdout and "--description" in proc.stdout
