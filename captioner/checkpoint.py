"""Model folders: `config.json` + `model.safetensors` + JSON side files, written atomically.

Loading never unpickles: weights are read with safetensors only, and a folder holding anything that
looks like a pickle, a symlink, or JSON that is oversized or malformed is refused with a clear error.

A save writes a temporary sibling `.NAME.tmp-*`, fsyncs it, then swaps it in: on Linux with one
atomic exchange of the two names (renameat2 RENAME_EXCHANGE), so `NAME` is never missing; elsewhere
with two renames, and a kill between them leaves `NAME` missing and the previous folder in
`.NAME.old-*/NAME`. `recover_model_dir` (run at the start of every save, and by the training
scripts before `--resume`) puts that previous folder back and deletes the temporary siblings that
kills leave behind. Loading reads `NAME` only, so it never sees a half-written folder.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .files import atomic_dir, file_mode, fsync_dir

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
    recover_model_dir(path)  # one writer per folder: what is left from a killed save is stale
    with atomic_dir(path, replace=_replace_dir) as tmp:  # tmp: `.NAME.tmp-*`, see recover
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
    return path


def update_model_dir(
    path: str | Path,
    files: dict[str, Any] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Add (or replace) side files of an existing model folder, atomically: its files are copied
    into a temporary sibling, the new `files` (JSON) and `tensors` (`*.safetensors`) written
    there, then the folder is swapped in as `save_model_dir` does. `config.json` and the weights
    stay as they are. A symlinked `path` (`current -> v2`) updates the folder it points to."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model folder not found: {path}")
    path = path.resolve()
    for name in files or {}:
        if Path(name).name != name or not name.endswith(".json") or name == CONFIG:
            raise ValueError(
                f"side file name must be a plain *.json name other than {CONFIG}, got {name!r}"
            )
    for name in tensors or {}:
        if Path(name).name != name or not name.endswith(".safetensors") or name == WEIGHTS:
            raise ValueError(
                f"tensor file name must be a plain *.safetensors name other than {WEIGHTS}, got {name!r}"
            )
    recover_model_dir(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ModelDirError(f"model folder {path} is missing {name}")
    with atomic_dir(path, replace=_replace_dir) as tmp:
        for entry in sorted(path.iterdir()):
            if not stat.S_ISREG(entry.lstat().st_mode):
                raise ModelDirError(
                    f"model folder {path} holds {entry.name}, which is not a regular file; "
                    "refusing to update it"
                )
            if entry.name not in (files or {}) and entry.name not in (tensors or {}):
                shutil.copyfile(entry, tmp / entry.name)  # a new file: the umask's mode
        for name, data in (files or {}).items():
            _write_json(tmp / name, data)
        for name, data in (tensors or {}).items():
            save_tensors(tmp / name, data)
    return path


def recover_model_dir(path: str | Path) -> None:
    """Clean up after a save of `path` that was killed: if `path` is missing but its previous
    version waits in `.NAME.old-*/NAME` (a kill between the two renames), move it back; then
    delete the `.NAME.tmp-*` and `.NAME.old-*` siblings (half-written or superseded folders).

    Assumes nothing else is saving `path` at the same time (a second writer's temporary folder
    would be deleted).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    stale = sorted(
        p
        for p in path.parent.iterdir()
        if p.name.startswith((_tmp_prefix(path), _old_prefix(path)))
    )
    if not os.path.lexists(path):
        for p in stale:
            old = p / path.name
            if p.name.startswith(_old_prefix(path)) and not p.is_symlink() and os.path.lexists(old):
                os.replace(old, path)
                fsync_dir(path.parent)
                break
    for p in stale:
        _remove(p)


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


class _MetaTwin(TorchFunctionMode):
    """Used with `torch.device("meta")` while the twin is built, so the build runs no meta op
    written in Python: in torch 2.14 `normal_`, `arange` and even `t + 0.5` on a meta tensor run
    torch._refs, whose `torch._disable_dynamo` wrapper imports torch._dynamo and sympy (~890
    modules, ~180 MB of RSS once the two demo models are loaded). Weight init (nn.init, which
    nn.Embedding and torchvision call, and `Tensor.normal_`) is skipped: it only writes values,
    which a meta tensor does not hold. Ranges (`arange`, VQANet's cell grid) are built on CPU:
    they hold no weights and are sized by the encoder grid, which EncoderConfig caps."""

    _RANGES = frozenset({torch.arange, torch.linspace, torch.logspace})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" or func is torch.Tensor.normal_:
            return args[0] if args else kwargs["tensor"]
        if func in self._RANGES and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def build_checked(
    build: Callable[[], torch.nn.Module], state_dict: dict[str, torch.Tensor], where: Path | str
) -> torch.nn.Module:
    """`build()` the network a config.json describes and load `state_dict` into it strictly.

    The names, shapes and dtypes are first checked on a twin built on the meta device (no
    memory), so a config.json asking for huge layers is refused before anything is allocated:
    once they match, the model is no larger than the weights file. The twin skips weight init
    and builds ranges on CPU (see `_MetaTwin`).
    """
    with torch.device("meta"), _MetaTwin():
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
    os.chmod(file, file_mode())  # safetensors makes it 0600
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


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _old_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def _replace_dir(new: Path, path: Path) -> None:
    """Put the folder `new` at `path`, replacing any folder there (see the module docstring)."""
    if not os.path.lexists(path):
        os.replace(new, path)
    elif _exchange(new, path):
        _remove(new)  # `new` now holds the previous folder (or symlink)
    else:
        old = Path(tempfile.mkdtemp(prefix=_old_prefix(path), dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc/musl symbol (glibc < 2.28)
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # an old kernel or a filesystem without exchange: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())
