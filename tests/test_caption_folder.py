"""training.caption_folder: lines, unreadable files, overlays, COCO results, resuming, kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from captioner.caption.captioner import Captioner
from captioner.data.shapes import generate_split, render
from captioner.paths import REPO_ROOT
from captioner.vocab import Vocabulary
from tests.conftest import assert_umask_modes, tiny_model
from training import caption_folder
from training.caption_folder import coco_results, consolidate, part_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    scenes = generate_split(4, seed=5, size=32)
    vocab = Vocabulary.build(c for s in scenes for c in s.captions)
    return Captioner(tiny_model(len(vocab)), vocab, name="tiny").save(
        tmp_path_factory.mktemp("model") / "tiny"
    )


def _folder(root: Path, n: int, seed: int = 0, start_id: int = 1) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for scene in generate_split(n, seed=seed, size=32, start_id=start_id):
        render(scene).save(root / scene.file_name)
        names.append(scene.file_name)
    return names


def _run(in_dir: Path, out: Path, model: Path, *extra: str) -> dict:
    argv = [str(in_dir), "--out", str(out), "--model", str(model), "--device", "cpu"]
    args = caption_folder.get_args_parser().parse_args([*argv, "--no-progress", *extra])
    return caption_folder.main(args)


def _lines(out: Path) -> list[dict]:
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _paths(out: Path) -> list[str]:
    return sorted(rec["path"] for rec in _lines(out))


def test_captions_a_folder_skipping_unreadable_files(tmp_path, model_dir, capsys):
    names = _folder(tmp_path / "in", 3, start_id=11)  # 000000000011.png ...
    (tmp_path / "in" / "broken.jpg").write_text("not an image")
    (tmp_path / "in" / "notes.txt").write_text("not an image suffix: ignored")
    (tmp_path / "in" / "sub").mkdir()
    render(generate_split(1, seed=9, size=32)[0]).save(tmp_path / "in" / "sub" / "deep.png")
    out, coco = tmp_path / "out.jsonl", tmp_path / "coco.json"
    overlays = tmp_path / "in" / "overlays"  # inside the folder: never captioned itself
    extra = ("--batch-size", "2", "--overlays", str(overlays), "--coco-results", str(coco))
    summary = _run(tmp_path / "in", out, model_dir, *extra)

    records = {rec["path"]: rec for rec in _lines(out)}
    assert sorted(records) == sorted([*names, "broken.jpg"])  # no sub/ without --recursive
    assert "not a recognised image" in records["broken.jpg"]["error"]
    for name in names:
        assert set(records[name]) == {"path", "caption", "score", "finished"}
        assert records[name]["caption"] and records[name]["score"] < 0
        assert records[name]["finished"] is False  # the untrained model never writes <end>
    assert summary["images"] == 4 and summary["captioned"] == 3 and summary["errors"] == 1
    assert "broken.jpg" in capsys.readouterr().err

    with Image.open(overlays / f"{names[0]}.png") as strip:  # the image, then a panel per word
        width = strip.width
    words = len(Captioner.load(model_dir).caption([tmp_path / "in" / names[0]])[0].tokens)
    assert width == (1 + words) * caption_folder.STRIP_HEIGHT
    assert sorted(p.name for p in overlays.iterdir()) == sorted(f"{n}.png" for n in names)

    ids = [r["image_id"] for r in json.loads(coco.read_text())]
    assert ids == [1, 2, 3]  # not 11, 12, 13: "broken" is not numeric, so listing positions

    summary = _run(tmp_path / "in", out, model_dir, "--recursive", *extra)
    assert summary["new_captions"] == 1
    assert _paths(out) == sorted([*names, "broken.jpg", "sub/deep.png"])
    assert (overlays / "sub" / "deep.png.png").is_file()


def test_each_line_says_whether_the_caption_was_finished(tmp_path):
    from tests.conftest import TINY_CAPTIONS, scripted_model

    vocab = Vocabulary.build(TINY_CAPTIONS)
    model = scripted_model(vocab, ["two", "green", "triangles"])
    folder = Captioner(model, vocab, name="scripted").save(tmp_path / "scripted")
    _folder(tmp_path / "in", 2)
    _run(tmp_path / "in", tmp_path / "ended.jsonl", folder)
    _run(tmp_path / "in", tmp_path / "cut.jsonl", folder, "--max-length", "2")
    ended, cut = _lines(tmp_path / "ended.jsonl"), _lines(tmp_path / "cut.jsonl")
    assert [(r["caption"], r["finished"]) for r in ended] == [("two green triangles", True)] * 2
    assert [(r["caption"], r["finished"]) for r in cut] == [("two green", False)] * 2


def test_outputs_get_the_modes_the_umask_implies(tmp_path, model_dir, umask):
    """The lines (appended to a new file, then rewritten when a rerun repairs a torn line), the
    overlays and the COCO results: what a plain mkdir()/open() would give under the umask."""
    _folder(tmp_path / "in", 2)
    out, overlays = tmp_path / "out" / "captions.jsonl", tmp_path / "overlays"
    extra = ("--overlays", str(overlays), "--coco-results", str(tmp_path / "out" / "coco.json"))
    _run(tmp_path / "in", out, model_dir, *extra)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["captions.jsonl", "coco.json"]
    assert len(list(overlays.iterdir())) == 2
    assert_umask_modes(umask, tmp_path / "out", overlays)

    with open(out, "a", encoding="utf-8") as f:
        f.write('{"path": "torn')  # what a kill mid-write leaves: the rerun rewrites the file
    assert _run(tmp_path / "in", out, model_dir, *extra)["new_captions"] == 0
    assert not out.read_text(encoding="utf-8").endswith("torn")
    assert_umask_modes(umask, tmp_path / "out", overlays)


def test_rerun_adds_nothing_and_repairs_lost_or_torn_lines(tmp_path, model_dir):
    names = _folder(tmp_path / "in", 5)
    out = tmp_path / "out.jsonl"
    _run(tmp_path / "in", out, model_dir, "--batch-size", "2")
    before = out.read_bytes()
    summary = _run(tmp_path / "in", out, model_dir)
    assert out.read_bytes() == before and summary["new_captions"] == 0

    lines = before.decode().splitlines(keepends=True)
    del lines[1]  # a lost line, and a torn one where a kill cut a write short
    out.write_text("".join(lines) + lines[0][:25])
    summary = _run(tmp_path / "in", out, model_dir)
    assert summary["new_captions"] == 1
    assert _paths(out) == sorted(names)


def test_retry_errors(tmp_path, model_dir):
    _folder(tmp_path / "in", 2)
    bad = tmp_path / "in" / "later.png"
    bad.write_bytes(b"\x89PNG broken")
    out = tmp_path / "out.jsonl"
    assert _run(tmp_path / "in", out, model_dir)["errors"] == 1
    render(generate_split(1, seed=7, size=32)[0]).save(bad)  # fixed since
    assert _run(tmp_path / "in", out, model_dir)["errors"] == 1  # not retried by default
    summary = _run(tmp_path / "in", out, model_dir, "--retry-errors")
    assert summary["errors"] == 0 and summary["new_captions"] == 1
    assert len(_lines(out)) == 3 and all("caption" in r for r in _lines(out))


def test_parts_of_a_killed_sharded_run_are_merged(tmp_path, model_dir):
    names = _folder(tmp_path / "in", 4)
    out = tmp_path / "out.jsonl"
    line = {"path": names[0], "caption": "a red circle", "score": -1.0}
    part_path(out, 0).write_text(json.dumps(line) + "\n")
    dup = {"path": names[0], "caption": "a blue square", "score": -2.0}
    part_path(out, 3).write_text(json.dumps(dup) + "\n" + '{"path": "' + names[1])  # torn
    summary = _run(tmp_path / "in", out, model_dir)
    assert summary["new_captions"] == 3
    assert _paths(out) == sorted(names)
    assert _lines(out)[0]["caption"] == "a red circle"  # the first wins; nothing duplicated
    assert not part_path(out, 0).exists() and not part_path(out, 3).exists()


def test_consolidate_prefers_captions_and_leaves_a_clean_file_alone(tmp_path):
    out = tmp_path / "out.jsonl"
    error = {"path": "a.png", "error": "bad"}
    caption = {"path": "a.png", "caption": "a cross", "score": -3.0}
    out.write_text(json.dumps(error) + "\n" + json.dumps(caption) + "\n")
    assert consolidate(out) == {"a.png": caption}
    assert _lines(out) == [caption]
    mtime = out.stat().st_mtime_ns
    consolidate(out)
    assert out.stat().st_mtime_ns == mtime


def test_coco_ids_from_numeric_stems():
    records = {"000000000139.jpg": {"caption": "x"}, "7.png": {"caption": "y"}, "9.png": {}}
    paths = ["000000000139.jpg", "7.png", "9.png"]
    assert coco_results(records, paths) == [
        {"image_id": 139, "caption": "x"},
        {"image_id": 7, "caption": "y"},
    ]
    clash = coco_results(
        {"7.png": {"caption": "y"}, "07.jpg": {"caption": "z"}}, ["07.jpg", "7.png"]
    )
    assert [r["image_id"] for r in clash] == [1, 2]  # 07 and 7 collide: positions instead


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        caption_folder.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_killed_at_random_moments_then_resumed(tmp_path, model_dir):
    """SIGKILL the script (a subprocess) twice mid-run, at a random number of finished lines;
    a third run completes it: exactly one whole line per image."""
    names = _folder(tmp_path / "in", 40)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "training.caption_folder", str(tmp_path / "in"), "--out", str(out)]
    cmd += ["--model", str(model_dir), "--batch-size", "2", "--device", "cpu", "--no-progress"]
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kills = 0
    for _ in range(2):
        start = _count_lines(out)
        target = start + rng.randint(1, max(1, (40 - start) // 2))
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and _count_lines(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stderr.close()
    assert kills == 2, f"the runs finished before being killed (seed {seed})"
    assert 0 < _count_lines(out) < 40
    summary = _run(tmp_path / "in", out, model_dir, "--batch-size", "2")
    assert summary["captioned"] == 40
    assert _paths(out) == sorted(names), f"seed {seed}"
