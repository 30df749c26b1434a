import json
import pickle
import subprocess
import sys

import pytest
import torch

from captioner.caption.captioner import Captioner
from captioner.checkpoint import (
    ModelDirError,
    load_model_dir,
    load_tensors,
    save_model_dir,
    update_model_dir,
)
from tests.api_fixtures import save_tiny_captioner, save_tiny_vqa
from tests.conftest import assert_umask_modes


def _images(n=3, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
        for _ in range(n)
    ]


def test_save_then_load_gives_identical_outputs(tmp_path, captioner):
    captioner.save(tmp_path / "m", training={"seed": 1, "data": "tiny"})
    loaded = Captioner.load(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "card.json",
        "config.json",
        "model.safetensors",
        "training.json",
        "vocab.json",
    ]
    images = _images()
    a = captioner.caption(images, beam_size=3, max_length=8)
    b = loaded.caption(images, beam_size=3, max_length=8)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    for k, v in captioner.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    assert loaded.training == {"seed": 1, "data": "tiny"}
    assert loaded.metadata()["vocabulary_size"] == len(captioner.vocab)


def test_overwrite_is_atomic_and_leaves_no_temporary_folders(tmp_path, captioner):
    captioner.save(tmp_path / "m")
    captioner.save(tmp_path / "m", training={"again": True})
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert json.loads((tmp_path / "m" / "training.json").read_text()) == {"again": True}


def test_a_saved_folder_gets_the_modes_the_umask_implies(tmp_path, captioner, umask):
    """A service running as another user can read the model when the umask lets it (0022), and
    only the owner when it does not (0077): the modes a plain mkdir()/open() would give."""
    captioner.save(tmp_path / "m")
    assert_umask_modes(umask, tmp_path / "m")
    captioner.save(tmp_path / "m", training={"again": True})  # replacing a folder: the same
    assert_umask_modes(umask, tmp_path / "m")


def test_failed_write_leaves_the_old_folder_untouched(tmp_path, captioner):
    captioner.save(tmp_path / "m", training={"v": 1})
    with pytest.raises(ValueError):
        save_model_dir(tmp_path / "m", {"kind": "captioner"}, {}, files={"../evil.json": {}})
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert json.loads((tmp_path / "m" / "training.json").read_text()) == {"v": 1}


def test_extra_tensor_files_round_trip(tmp_path):
    save_model_dir(
        tmp_path / "m",
        {"kind": "x"},
        {"w": torch.ones(2)},
        tensors={"optimizer.safetensors": {"a": torch.arange(3)}},
    )
    assert torch.equal(load_tensors(tmp_path / "m" / "optimizer.safetensors")["a"], torch.arange(3))


def test_folder_containing_a_pickle_is_refused_without_unpickling(tmp_path, captioner):
    captioner.save(tmp_path / "m")

    class Boom:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    (tmp_path / "m" / "model.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelDirError, match="pickle"):
        Captioner.load(tmp_path / "m")
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_are_a_pickle_under_the_safetensors_name_are_refused(tmp_path, captioner):
    captioner.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(ModelDirError, match="safetensors"):
        Captioner.load(tmp_path / "m")


@pytest.mark.parametrize("missing", ["config.json", "vocab.json", "model.safetensors"])
def test_missing_file_is_named(tmp_path, captioner, missing):
    captioner.save(tmp_path / "m")
    (tmp_path / "m" / missing).unlink()
    with pytest.raises(ModelDirError, match=missing):
        Captioner.load(tmp_path / "m")


def test_mismatched_weights_and_config_are_a_clear_error(tmp_path, captioner):
    captioner.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["decoder"]["hidden_dim"] += 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="do not match"):
        Captioner.load(tmp_path / "m")


def test_malformed_json_symlinks_wrong_kind_and_version_are_refused(tmp_path, captioner):
    captioner.save(tmp_path / "m")
    (tmp_path / "m" / "vocab.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        Captioner.load(tmp_path / "m")
    captioner.save(tmp_path / "m")
    (tmp_path / "m" / "extra.json").symlink_to("/etc/passwd")
    with pytest.raises(ModelDirError, match="symlink"):
        Captioner.load(tmp_path / "m")
    captioner.save(tmp_path / "m")
    with pytest.raises(ModelDirError, match="'vqa'"):
        load_model_dir(tmp_path / "m", "vqa")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="format_version"):
        Captioner.load(tmp_path / "m")
    with pytest.raises(ModelDirError, match="not found"):
        Captioner.load(tmp_path / "nope")


def test_loading_does_not_import_torch_dynamo(tmp_path):
    """The size check builds a twin on the meta device; torch's meta kernels written in Python
    import torch._dynamo and sympy (~180 MB more RSS with the two demo models), so a fresh process
    that loads a captioner and a VQA model must have neither."""
    save_tiny_captioner(tmp_path / "cap")
    save_tiny_vqa(tmp_path / "vqa")
    code = (
        "import sys\n"
        "from captioner.caption.captioner import Captioner\n"
        "from captioner.vqa.answerer import Answerer\n"
        f"Captioner.load({str(tmp_path / 'cap')!r})\n"
        f"Answerer.load({str(tmp_path / 'vqa')!r})\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_update_adds_side_files_keeping_the_rest_and_the_umask_modes(tmp_path, captioner, umask):
    captioner.save(tmp_path / "m", training={"seed": 1})
    (tmp_path / "current").symlink_to(tmp_path / "m")  # an operator's switch: updates its target
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    update_model_dir(
        tmp_path / "current",
        files={"extra.json": {"a": 1}},
        tensors={"x.safetensors": {"t": torch.ones(2)}},
    )
    assert (tmp_path / "current").is_symlink()
    after = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    assert set(after) == set(before) | {"extra.json", "x.safetensors"}
    assert all(after[name] == data for name, data in before.items())
    _, _, side = load_model_dir(tmp_path / "m", "captioner")
    assert side["extra.json"] == {"a": 1}
    assert torch.equal(load_tensors(tmp_path / "m" / "x.safetensors")["t"], torch.ones(2))
    assert_umask_modes(umask, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "m"]


def test_update_refuses_bad_names_and_folders_that_are_not_model_folders(tmp_path, captioner):
    captioner.save(tmp_path / "m")
    for files, tensors in (
        ({"config.json": {}}, None),
        ({"../x.json": {}}, None),
        (None, {"model.safetensors": {"t": torch.ones(1)}}),
        ({"x.txt": {}}, None),
    ):
        with pytest.raises(ValueError, match="name"):
            update_model_dir(tmp_path / "m", files=files, tensors=tensors)
    with pytest.raises(ModelDirError, match="not found"):
        update_model_dir(tmp_path / "nothing", files={"a.json": {}})
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelDirError, match="missing config.json"):
        update_model_dir(tmp_path / "half", files={"a.json": {}})
    (tmp_path / "m" / "sub").mkdir()
    with pytest.raises(ModelDirError, match="sub, which is not a regular file"):
        update_model_dir(tmp_path / "m", files={"a.json": {}})
    assert not (tmp_path / "m" / "a.json").exists()
