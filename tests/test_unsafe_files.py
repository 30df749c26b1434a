"""Unsafe files: a model folder (from anywhere) and an upload (from anyone) never run code, never
read or write outside their place, and fail with a `ModelDirError` or a 4xx that names the problem.

Decisions these tests pin down:
- paths inside config.json (the encoder's pretrained `weights` file) are ignored at load time:
  a model folder's weights come from its model.safetensors only, so nothing a config names is read;
- the model folder itself may be a symlink (it is the operator's own setting, like
  `models/current -> models/v2`); anything inside it that is a symlink is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import struct
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from api.app import create_app
from captioner.caption.captioner import Captioner
from captioner.checkpoint import MAX_JSON_BYTES, MAX_JSON_DEPTH, ModelDirError
from captioner.encoder import Encoder, EncoderConfig, load_state_dict_file
from captioner.vqa.answerer import Answerer
from tests.api_fixtures import (
    TestClient,
    assert_error,
    encode,
    noise_image,
    png,
    save_tiny_captioner,
    save_tiny_vqa,
    settings,
)

LOADERS = {"captioner": Captioner.load, "vqa": Answerer.load}


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(params=sorted(LOADERS))
def model_dir(request, tmp_path):
    """`(folder, load)` for a tiny saved model of each kind, at tmp_path/models/<kind>."""
    path = tmp_path / "models" / request.param
    (save_tiny_captioner if request.param == "captioner" else save_tiny_vqa)(path)
    return path, LOADERS[request.param]


def _weights_equal(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _section(config: dict) -> dict:
    return config["decoder"] if config["kind"] == "captioner" else config["vqa"]


# -- pickles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_with_a_payload_as_the_weights_file_is_refused_unrun(model_dir, tmp_path, writer):
    folder, load = model_dir
    marker = tmp_path / "PWNED"
    weights = folder / "model.safetensors"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"w": torch.ones(2), "boom": Payload(marker)}, weights)
    with pytest.raises(ModelDirError, match=r"model\.safetensors is not a valid safetensors file"):
        load(folder)
    assert not marker.exists()
    # The payload is live: unpickling it the unsafe way does run it.
    if writer == "pickle":
        pickle.loads(weights.read_bytes())
    else:  # (torch.load hands a *.safetensors name to safetensors, so under another name)
        copy = tmp_path / "copy.pt"
        copy.write_bytes(weights.read_bytes())
        torch.load(copy, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "pytorch_model.BIN", "state.pth"])
def test_pickle_beside_the_weights_is_refused_unrun(model_dir, tmp_path, name):
    folder, load = model_dir
    marker = tmp_path / "PWNED"
    torch.save({"boom": Payload(marker)}, folder / name)
    with pytest.raises(ModelDirError, match=rf"contains {name}, a pickle-style file"):
        load(folder)
    assert not marker.exists()


def test_pretrained_encoder_weights_that_are_a_payload_are_refused_unrun(tmp_path):
    """The one place a `.pt` is read (training's `--encoder-weights`) uses `weights_only=True`."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "encoder.pt"
    torch.save({"boom": Payload(marker)}, evil)
    with pytest.raises(
        ValueError, match="cannot read encoder weights .*encoder.pt as plain tensors"
    ):
        load_state_dict_file(evil)
    with pytest.raises(ValueError, match="cannot read encoder weights"):
        Encoder(EncoderConfig(name="resnet18", input_size=32, weights=str(evil)))
    assert not marker.exists()


# -- paths named inside the folder ----------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", ["../../etc/passwd", "/etc/passwd", "../payload.pt", "../../missing.pt"]
)
def test_paths_in_config_json_are_ignored_at_load(model_dir, tmp_path, weights):
    """Were the encoder's `weights` followed, each of these would fail to load (not a state dict,
    refused by weights_only, not found); the model loads from model.safetensors alone."""
    folder, load = model_dir
    marker = tmp_path / "PWNED"
    torch.save({"boom": Payload(marker)}, folder.parent / "payload.pt")
    original = load(folder)
    _edit_config(folder, lambda c: c["encoder"].update(weights=weights))
    loaded = load(folder)
    assert loaded.model.encoder.config.weights == weights  # kept as a record of how it was made
    assert _weights_equal(loaded, original)
    assert not marker.exists()


# -- symlinks and special files -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "training.json"])
def test_a_symlink_inside_the_folder_is_refused_even_to_a_valid_file(model_dir, tmp_path, name):
    folder, load = model_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / name
    target.write_bytes((folder / name).read_bytes())  # a valid file: following it would work
    (folder / name).unlink()
    (folder / name).symlink_to(target)
    with pytest.raises(ModelDirError, match=rf"contains a symlink \({name}\)"):
        load(folder)


def test_a_symlinked_subfolder_inside_the_folder_is_refused(model_dir):
    folder, load = model_dir
    (folder / "extra").symlink_to("/etc")
    with pytest.raises(ModelDirError, match=r"contains a symlink \(extra\)"):
        load(folder)


def test_the_model_folder_itself_may_be_a_symlink(model_dir, tmp_path):
    folder, load = model_dir
    link = tmp_path / "current"
    link.symlink_to(folder, target_is_directory=True)
    assert _weights_equal(load(link), load(folder))
    (folder / "vocab.json").write_text("{")
    (folder / "question_vocab.json").write_text("{")
    with pytest.raises(ModelDirError, match=str(folder)):  # errors name the real folder
        load(link)


def test_a_fifo_in_the_folder_is_refused_without_blocking(model_dir):
    folder, load = model_dir
    os.mkfifo(folder / "extra.json")  # opening it for reading would wait for a writer forever
    outcome = []

    def attempt():
        try:
            load(folder)
        except ModelDirError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "loading blocked on the FIFO"
    assert outcome and "extra.json, which is not a regular file" in outcome[0]


def test_a_subfolder_named_like_json_is_not_read(model_dir):
    folder, load = model_dir
    (folder / "notes.json").mkdir()
    (folder / "notes.json" / "x").write_text("not looked at")
    load(folder)


# -- JSON -----------------------------------------------------------------------------------------


def test_oversized_json_is_refused_before_parsing(model_dir):
    folder, load = model_dir
    with open(folder / "config.json", "r+b") as f:  # 100 MB, sparse: costs no disk
        f.truncate(100 * 1024 * 1024)
    with pytest.raises(
        ModelDirError, match=rf"config\.json is 104857600 bytes; .*{MAX_JSON_BYTES}"
    ):
        load(folder)


def test_valid_json_just_over_the_cap_is_refused(model_dir):
    folder, load = model_dir
    name = "vocab.json" if folder.name == "captioner" else "question_vocab.json"
    data = json.loads((folder / name).read_text())
    text = json.dumps(data)
    data["padding"] = " " * (MAX_JSON_BYTES + 1 - len(text) - len(', "padding": ""'))
    (folder / name).write_text(json.dumps(data))
    assert (folder / name).stat().st_size == MAX_JSON_BYTES + 1
    with pytest.raises(ModelDirError, match=rf"{name} is {MAX_JSON_BYTES + 1} bytes"):
        load(folder)
    data["padding"] = data["padding"][:-1]  # one byte less: at the cap, it loads
    (folder / name).write_text(json.dumps(data))
    load(folder)


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (100_000, "not valid JSON: maximum recursion depth"),
        (MAX_JSON_DEPTH + 1, f"more than {MAX_JSON_DEPTH} levels deep"),
        (900, f"more than {MAX_JSON_DEPTH} levels deep"),
    ],
)
def test_deeply_nested_json_is_refused(model_dir, depth, message):
    folder, load = model_dir
    (folder / "training.json").write_text('{"a":' + "[" * (depth - 1) + "]" * (depth - 1) + "}")
    with pytest.raises(ModelDirError, match=rf"training\.json .*{message}"):
        load(folder)


def test_json_nested_up_to_the_cap_loads(model_dir):
    folder, load = model_dir
    nested: dict = {}
    for _ in range(MAX_JSON_DEPTH - 1):
        nested = {"a": nested}
    (folder / "training.json").write_text(json.dumps(nested))
    assert load(folder).training == nested


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.json", b"{not json", "config.json is not valid JSON"),
        ("config.json", b"", "config.json is not valid JSON"),
        ("training.json", b"\xff\xfe{}", "training.json is not valid JSON"),
        ("training.json", b'{"n": ' + b"9" * 5000 + b"}", "training.json is not valid JSON"),
        ("config.json", b"[1, 2]", "config.json must hold a JSON object"),
        ("training.json", b"[1, 2]", "training.json must hold a JSON object, not a list"),
        ("training.json", b'"text"', "training.json must hold a JSON object, not a str"),
        ("extra.json", b"null", "extra.json must hold a JSON object, not a NoneType"),
    ],
)
def test_malformed_or_mistyped_json_is_refused(model_dir, name, content, message):
    folder, load = model_dir
    (folder / name).write_bytes(content)
    with pytest.raises(ModelDirError, match=message):
        load(folder)


def test_vocabularies_and_answers_of_the_wrong_shape_are_refused(model_dir):
    folder, load = model_dir
    if folder.name == "captioner":
        cases = {"vocab.json": {"words": "abc"}}
    else:
        cases = {"answers.json": {"answers": "yes"}, "question_vocab.json": {"words": [1, 2]}}
    for name, data in cases.items():
        good = (folder / name).read_text()
        (folder / name).write_text(json.dumps(data))
        with pytest.raises(ModelDirError, match=r"not describe a (captioner|VQA model)"):
            load(folder)
        (folder / name).write_text(good)
    load(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(encoder="resnet50"), "must be a mapping"),
        (lambda c: _section(c).update(hidden_dim="24"), "not supported between"),
        (lambda c: _section(c).update(hidden_dim=8.0), "not describe .* float"),
        (lambda c: _section(c).update(cell="transformer"), "unknown cell 'transformer'"),
        (lambda c: c["encoder"].update(name="vit"), "unknown encoder 'vit'"),
        (lambda c: c["encoder"].update(input_size=100_000), r"input_size must be 16\.\.1024"),
        (lambda c: c["encoder"].update(grid_size=10_000), r"grid_size must be 0\.\.32"),
        (lambda c: c["encoder"].update(extra=1), "unexpected keyword argument 'extra'"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_are_refused(model_dir, edit, message):
    folder, load = model_dir
    _edit_config(folder, edit)
    with pytest.raises(ModelDirError, match=message):
        load(folder)


def test_config_asking_for_huge_layers_is_refused_before_allocating(model_dir):
    """A million-wide hidden layer would need terabytes: the sizes are checked against the
    weights file on the meta device first, so the error is about the weights, not memory."""
    folder, load = model_dir
    _edit_config(folder, lambda c: _section(c).update(hidden_dim=1_000_000))
    with pytest.raises(ModelDirError, match=r"do not match its config\.json: .*1000000"):
        load(folder)


# -- weights --------------------------------------------------------------------------------------


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: change(k, v) for k, v in tensors.items()}, str(folder / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_weights_of_a_non_float_dtype_are_refused(model_dir, dtype):
    folder, load = model_dir
    _rewrite_weights(folder, lambda k, v: v.to(dtype) if v.is_floating_point() else v)
    with pytest.raises(
        ModelDirError, match=rf"dtype of .* is {dtype}, the model uses torch.float32"
    ):
        load(folder)


def test_a_float_in_place_of_an_integer_buffer_is_refused(model_dir):
    folder, load = model_dir
    _rewrite_weights(folder, lambda k, v: v.double() if not v.is_floating_point() else v)
    with pytest.raises(ModelDirError, match=r"num_batches_tracked is torch.float64.*torch.int64"):
        load(folder)


def test_half_precision_weights_load_as_float32(model_dir):
    folder, load = model_dir
    _rewrite_weights(folder, lambda k, v: v.half() if v.is_floating_point() else v)
    model = load(folder).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_weights_of_the_wrong_shape_are_refused(model_dir):
    folder, load = model_dir
    first = next(iter(load_file(str(folder / "model.safetensors"))))
    _rewrite_weights(folder, lambda k, v: v.flatten()[:-1] if k == first else v)
    with pytest.raises(ModelDirError, match=rf"shape of {first} is"):
        load(folder)


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _huge_header(data: bytes) -> bytes:
    return struct.pack("<Q", 2**60) + data[8:]


@pytest.mark.parametrize(
    "damage",
    [lambda d: b"", lambda d: d[:7], _truncate, lambda d: d[:-1], _huge_header],
    ids=["empty", "7-bytes", "half", "last-byte-missing", "huge-header-length"],
)
def test_damaged_safetensors_are_refused(model_dir, damage):
    folder, load = model_dir
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelDirError, match=r"model\.safetensors is not a valid safetensors file"):
        load(folder)


def test_a_refused_folder_is_a_503_with_the_reason_never_a_crash(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    (folder / "training.json").write_text("[]")
    with TestClient(create_app(settings(caption_model=folder))) as client:
        assert "training.json must hold a JSON object" in assert_error(client.get("/ready"), 503)
        assert client.get("/models").json() == {"models": []}
        assert client.get("/health").status_code == 200


# -- uploads --------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../x.png",
    "/etc/passwd",
    "..\\..\\x",
    "../../../../../../../../x.png",
    "a/../../b.png",
    "~/.bashrc",
]
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_FILE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link"}
_recording: list | None = None  # set while a test watches; the hook stays installed (it cannot go)


def _audit(event: str, args: tuple) -> None:
    if _recording is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writes and isinstance(path, str | bytes | os.PathLike):
            _recording.append((event, os.fsdecode(path)))
    elif event in _FILE_EVENTS:
        _recording.append((event, os.fsdecode(args[0])))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
    }


def test_upload_filenames_never_become_paths(tmp_path, monkeypatch):
    """Hostile filenames through the real app: the answer is a normal 200 or a 415, the only
    files opened for writing are Starlette's spooled temporaries in the temp dir we hand it,
    and nothing appears or changes anywhere else."""
    global _recording
    caption_dir = save_tiny_captioner(tmp_path / "models" / "cap")
    vqa_dir = save_tiny_vqa(tmp_path / "models" / "vqa")
    cwd = tmp_path / "srv" / "a" / "b"  # "../../x.png" from here lands inside tmp_path
    cwd.mkdir(parents=True)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    small = png(1)
    big = encode(noise_image(2, (700, 700)))  # over Starlette's 1 MB spool: goes to disk
    assert len(big) > 1024 * 1024
    outside = [Path("/x.png"), Path("/b.png"), Path("/etc/passwd"), Path.home() / ".bashrc"]
    before = {p: p.lstat() if p.exists() else None for p in outside}
    app = create_app(
        settings(caption_model=caption_dir, vqa_model=vqa_dir, max_upload_bytes=3_000_000)
    )
    with TestClient(app) as client:
        tree = _tree(tmp_path)
        sys.addaudithook(_audit)
        _recording = []
        try:
            for name in HOSTILE_NAMES:
                for data in (small, big):
                    ok = client.post("/caption", files={"image": (name, data, "image/png")})
                    assert ok.status_code == 200, ok.text
                    ok = client.post(
                        "/vqa",
                        files={"image": (name, data, "image/png")},
                        data={"question": "what color is the circle?"},
                    )
                    assert ok.status_code == 200, ok.text
                bad = client.post("/caption", files={"image": (name, b"not an image", "image/png")})
                assert_error(bad, 415)
                batch = client.post(
                    "/caption/batch",
                    files=[
                        ("image", (name, small, "image/png")),
                        ("image", (name, b"x", "text/plain")),
                    ],
                )
                detail = assert_error(batch, 415)
                assert f"image at index 1 ({name!r})" in detail  # the name arrived as it was sent
            events = list(_recording)
        finally:
            _recording = None
        assert _tree(tmp_path) == tree
    assert events, "the big uploads should have been spooled to disk"
    assert all(Path(path).resolve().is_relative_to(spool) for _, path in events), events
    assert list(spool.iterdir()) == []
    assert {p: p.lstat() if p.exists() else None for p in outside} == before
