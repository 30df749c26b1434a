"""Model folders: `config.json` + `model.safetensors` + JSON side files, written atomically.

Loading never unpickles: weights are read with safetensors only, and a folder holding anything that
looks like a pickle, a symlink, or JSON that is oversized or malformed is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CONFIG, WEIGHTS, TRAINING = "config.json", "model.safetensors", "training.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}
MAX_JSON_BYTES = 16 * 1024 * 1024  # a 10,000-word vocab.json is ~0.1 MB
MAX_JSON_DEPTH = 32  # trainer.json nests 5 levels; /models must serialise them


class ModelDirError(ValueError):
    """A model folder that is missing, incomplete, unsafe or does not match the code."""


def save_model_dir(
    path: str | Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    files: dict[str, Any] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a model folder atomically: everything goes to a temporary sibling, then one rename.

    `files` maps extra JSON file names (e.g. `vocab.json`, `training.json`) to JSON-able data and
    `tensors` extra `*.safetensors` names to tensor dicts (optimizer state for resuming). An
    existing folder at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_json(tmp / CONFIG, {"format_version": FORMAT_VERSION, **config})
        for name, data in (files or {}).items():
            if Path(name).name != name or not name.endswith(".json") or name == CONFIG:
                raise ValueError(
                    f"side file name must be a plain *.json name other than {CONFIG}, got {name!r}"
                )
            _write_json(tmp / name, data)
        for name, data in {WEIGHTS: state_dict, **(tensors or {})}.items():
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(
                    f"tensor file name must be a plain *.safetensors name, got {name!r}"
                )
            save_tensors(tmp / name, data)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model_dir(
    path: str | Path, kind: str, required: tuple[str, ...] = ()
) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any]]:
    """Read `(config, state_dict, side_files)` from a model folder written by `save_model_dir`.

    `kind` must match config["kind"] (e.g. "captioner", "vqa"); `required` names side JSON files
    that must be present. Every side *.json in the folder is returned, parsed; each must hold a
    JSON object.

    `path` itself may be a symlink (it is the operator's own setting, and `current -> v2` is a
    common way to switch models); it is resolved once, so a switch during the load cannot mix two
    versions. Inside the folder nothing may be a symlink or a special file (FIFO, device, socket).
    """
    path = Path(path)
    if not path.exists():
        raise ModelDirError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelDirError(f"model path must be a folder, not a file: {path}")
    path = path.resolve()
    entries = list(path.iterdir())
    for entry in entries:
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise ModelDirError(
                f"model folder {path} contains a symlink ({entry.name}); refusing to load it"
            )
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelDirError(
                f"model folder {path} contains {entry.name}, which is not a regular file "
                "(a FIFO, socket or device); refusing to load it"
            )
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelDirError(
                f"model folder {path} contains {entry.name}, a pickle-style file; only {WEIGHTS} "
                "weights are read, so refusing to load (convert it to safetensors)"
            )
    for name in (CONFIG, WEIGHTS, *required):
        if not (path / name).is_file():
            raise ModelDirError(f"model folder {path} is missing {name}")
    config = _read_json(path / CONFIG)
    if not isinstance(config, dict):
        raise ModelDirError(f"{path / CONFIG} must hold a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{path / CONFIG} has format_version {config.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    if config.get("kind") != kind:
        raise ModelDirError(f"{path} holds a {config.get('kind')!r} model, expected {kind!r}")
    side = {}
    for entry in sorted(entries):
        if entry.suffix == ".json" and entry.name != CONFIG and entry.is_file():
            side[entry.name] = _read_json(entry)
            if not isinstance(side[entry.name], dict):
                raise ModelDirError(
                    f"{entry} must hold a JSON object, not a {type(side[entry.name]).__name__}"
                )
    return config, _read_weights(path / WEIGHTS), side


def build_checked(
    build: Callable[[], torch.nn.Module], state_dict: dict[str, torch.Tensor], where: Path | str
) -> torch.nn.Module:
    """`build()` the network a config.json describes and load `state_dict` into it strictly.

    The names, shapes and dtypes are first checked on a twin built on the meta device (no
    memory), so a config.json asking for huge layers is refused before anything is allocated:
    once they match, the model is no larger than the weights file.
    """
    with torch.device("meta"):
        probe = build()
    _check_tensors(probe.state_dict(), state_dict, where)
    model = build()
    model.load_state_dict(state_dict, strict=True)
    return model


def check_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: Path | str
) -> None:
    """Load weights strictly, turning key, shape and dtype mismatches into one readable error."""
    _check_tensors(model.state_dict(), state_dict, where)
    model.load_state_dict(state_dict, strict=True)


def _check_tensors(
    own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], where: Path | str
) -> None:
    """Floating-point weights may come in any float dtype (they are cast on load); integer and
    boolean buffers must have the model's own dtype, and no float may stand in for them."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    bad_dtype = sorted(
        k
        for k in set(own) & set(state_dict)
        if not (own[k].is_floating_point() and state_dict[k].is_floating_point())
        and own[k].dtype != state_dict[k].dtype
    )
    if missing or unexpected or wrong or bad_dtype:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"shape of {k} is {tuple(state_dict[k].shape)}, config says {tuple(own[k].shape)}"
            )
        if bad_dtype:
            k = bad_dtype[0]
            parts.append(f"dtype of {k} is {state_dict[k].dtype}, the model uses {own[k].dtype}")
        raise ModelDirError(f"weights in {where} do not match its config.json: " + "; ".join(parts))


def save_tensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(file),
        metadata={"format": "pt"},
    )
    _fsync(file)


def load_tensors(file: str | Path) -> dict[str, torch.Tensor]:
    """A `*.safetensors` file of a model folder (weights or optimizer state), as CPU tensors."""
    return _read_weights(Path(file))


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelDirError(f"{file} is not a valid safetensors file: {exc}") from exc


def _read_json(file: Path) -> Any:
    """A JSON file of a model folder: a regular file (opened without following a symlink) of at
    most `MAX_JSON_BYTES`, checked before parsing, nested at most `MAX_JSON_DEPTH` levels."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(file, flags)
    except OSError as exc:  # ELOOP: it became a symlink after the folder was checked
        raise ModelDirError(f"cannot open {file}: {exc}") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelDirError(f"{file} is not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise ModelDirError(
                f"{file} is {info.st_size} bytes; JSON files in a model folder are capped at "
                f"{MAX_JSON_BYTES} bytes"
            )
        data = f.read(MAX_JSON_BYTES + 1)  # bounded even if the file grows meanwhile
    if len(data) > MAX_JSON_BYTES:
        raise ModelDirError(
            f"{file} is over {MAX_JSON_BYTES} bytes, the cap for JSON files in a model folder"
        )
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer of 4300+ digits
        raise ModelDirError(f"{file} is not valid JSON: {exc}") from exc
    if _nesting(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ModelDirError(
            f"{file} nests objects or lists more than {MAX_JSON_DEPTH} levels deep, "
            "the cap for JSON files in a model folder"
        )
    return value


def _nesting(value: Any, limit: int) -> int:
    """How many levels of objects/lists `value` has, counting no further than `limit + 1`."""
    depth, level = 0, [value] if isinstance(value, dict | list) else []
    while level and depth <= limit:
        depth += 1
        level = [
            child
            for v in level
            for child in (v.values() if isinstance(v, dict) else v)
            if isinstance(child, dict | list)
        ]
    return depth


def _write_json(file: Path, data: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
