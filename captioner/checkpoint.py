"""Model folders: `config.json` + `model.safetensors` + JSON side files, written atomically.

Loading never unpickles: weights are read with safetensors only, and a folder holding anything that
looks like a pickle, a symlink, or JSON that is oversized or malformed is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CONFIG, WEIGHTS, TRAINING = "config.json", "model.safetensors", "training.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}
MAX_JSON_BYTES = 16 * 1024 * 1024


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
    that must be present. Every side *.json in the folder is returned, parsed.
    """
    path = Path(path)
    if not path.exists():
        raise ModelDirError(f"model folder not found: {path}")
    if path.is_symlink() or not path.is_dir():
        raise ModelDirError(f"model path must be a real folder, not a file or symlink: {path}")
    entries = list(path.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise ModelDirError(
                f"model folder {path} contains a symlink ({entry.name}); refusing to load it"
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
    side = {e.name: _read_json(e) for e in entries if e.suffix == ".json" and e.name != CONFIG}
    return config, _read_weights(path / WEIGHTS), side


def check_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: Path | str
) -> None:
    """Load weights strictly, turning key and shape mismatches into one readable error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
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
        raise ModelDirError(f"weights in {where} do not match its config.json: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


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
    size = file.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelDirError(
            f"{file} is {size} bytes; JSON files in a model folder are capped at {MAX_JSON_BYTES}"
        )
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelDirError(f"{file} is not valid JSON: {exc}") from exc


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
