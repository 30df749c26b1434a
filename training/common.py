"""What the training scripts share: distributed setup, run folders, resumable state, progress.

Written by hand where no library fits the project's rules: optimizer state is stored as safetensors
plus JSON (not `torch.save`), because model folders are never unpickled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from captioner.files import write_text_atomic

# -- distributed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; init NCCL on GPUs or gloo on CPUs when there are >1 processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but no CUDA device is available")
        dev = torch.device("cuda", local) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked (no loss scaling needed); a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# -- reproducibility ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int, d: Dist) -> list[int]:
    """The sample order for one epoch: a fixed permutation of (seed, epoch), sharded by rank.

    Every rank gets the same number of samples (the tail is padded by wrapping), as
    DistributedSampler does, so all ranks run the same number of steps.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / d.world_size)
    order += order[: per_rank * d.world_size - n]
    return order[d.rank :: d.world_size]


def grouped_epoch_order(groups: list[list[int]], seed: int, epoch: int, d: Dist) -> list[int]:
    """As `epoch_order`, but the groups (e.g. one image's captions) are shuffled whole and keep
    their samples together, so a batch holds few distinct images, each encoded once.

    Rank r takes the r-th contiguous slice of that order (the tail padded by wrapping, as in
    `epoch_order`), so every rank gets as many samples as `epoch_order` gives it and at most
    one group per rank boundary is split.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = [k for gi in torch.randperm(len(groups), generator=g).tolist() for k in groups[gi]]
    per_rank = math.ceil(len(order) / d.world_size)
    order += order[: per_rank * d.world_size - len(order)]
    return order[d.rank * per_rank : (d.rank + 1) * per_rank]


def batches(order: list[int], batch_size: int, skip: int = 0) -> Iterator[list[int]]:
    for start in range(skip * batch_size, len(order), batch_size):
        yield order[start : start + batch_size]


# -- optimizer state as tensors + JSON ---------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into tensors (for safetensors) and plain JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta.get("state", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, floor: float = 0.05
):
    """Linear warm-up then cosine decay to `floor` x the base rate, as a LambdaLR."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- run folders -------------------------------------------------------------------------------


class MetricsLog:
    """Metrics per epoch as JSON lines (`metrics.jsonl`), and to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def truncate_after(self, step: int, epoch: int | None = None) -> None:
        """On resume, drop lines logged after the checkpoint we resume from: a later step, a torn
        line, or (given `epoch`, the epochs the checkpoint has finished) a later epoch at the same
        step, which a kill between an epoch's line and that epoch's save leaves."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            at = _position_of(line)
            if at is not None and at[0] <= step and (epoch is None or at[1] <= epoch):
                kept.append(line + "\n")
        write_text_atomic(self.path, "".join(kept))


def _position_of(line: str) -> tuple[int, int] | None:
    """(step, epoch) of a metrics line; None for a torn last line from a crash."""
    try:
        record = json.loads(line)
        return int(record["step"]), int(record.get("epoch", 0))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class EarlyStopping:
    """Stop when the watched metric has not improved for `patience` evaluations (higher is better)."""

    def __init__(self, patience: int, best: float = -math.inf, bad: int = 0):
        self.patience, self.best, self.bad = patience, best, bad

    def update(self, value: float) -> bool:
        """Record a new value; True when it is the best so far."""
        if value > self.best:
            self.best, self.bad = value, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict[str, float | int]:
        return {"best": self.best, "bad": self.bad}


# -- resume ------------------------------------------------------------------------------------


def resume_args(
    args: Any,
    argv: list[str] | None,
    always: Iterable[str] = (),
    given_again: Iterable[str] = (),
) -> Any:
    """On `--resume`: the run's own arguments from `run/args.json` (`args.out`), with the `always`
    ones taken from this command and the `given_again` ones only when this command line names
    them; `resume` is True. A run folder without args.json is refused with the reason."""
    run = Path(args.out)
    if not (run / "args.json").is_file():
        raise ValueError(f"--resume: {run / 'args.json'} not found; start {run} without --resume")
    saved = json.loads((run / "args.json").read_text())
    given = argv if argv is not None else sys.argv[1:]
    for key in always:
        saved[key] = getattr(args, key)
    for key in given_again:
        flag = "--" + key.replace("_", "-")
        if any(a == flag or a.startswith(flag + "=") for a in given):
            saved[key] = getattr(args, key)
    saved["resume"] = True
    return argparse.Namespace(**{**vars(args), **saved})


def recover_for_resume(run: Path, d: Dist, script: str) -> bool:
    """Before `--resume`: put back what a killed save left (temporary siblings, `last/` moved
    aside); True when `run/last` exists to resume from, False (said on stderr) when the killed run
    never saved, so it starts again at step 0."""
    from captioner.checkpoint import recover_model_dir

    if d.is_main:
        recover_model_dir(run / "last")
        recover_model_dir(run / "best")
    barrier(d)
    if (run / "last").exists():
        return True
    if d.is_main:
        print(f"{script}: {run / 'last'} not saved yet; starting at step 0", file=sys.stderr)
    return False


# -- transfer ------------------------------------------------------------------------------------


def load_encoder_from(encoder: torch.nn.Module, folder: str | Path) -> dict[str, Any]:
    """Copy the CNN weights of another model folder (a captioner or a VQA model) into `encoder`.

    The two encoders must be the same network (name and width); input size and grid pooling may
    differ, since they change no weight. Returns a record of where the weights came from.
    """
    from captioner.checkpoint import ModelDirError, load_model_dir
    from captioner.encoder import EncoderConfig

    folder = Path(folder)
    try:
        kind = json.loads((folder / "config.json").read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(
            f"--init-encoder {folder}: no readable config.json kind: {exc}"
        ) from exc
    config, weights, _ = load_model_dir(folder, str(kind))
    theirs, ours = EncoderConfig.from_dict(config["encoder"]), encoder.config
    if (theirs.name, theirs.width) != (ours.name, ours.width):
        raise ValueError(
            f"--init-encoder {folder}: its encoder is {theirs.name} (width {theirs.width}), "
            f"this model's is {ours.name} (width {ours.width})"
        )
    state = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    encoder.load_state_dict(state, strict=True)
    return {"folder": str(folder), "kind": kind, "name": config.get("name"), "tensors": len(state)}


# -- scripts ---------------------------------------------------------------------------------------


def run_script(main_fn, parser, script: str) -> None:
    """`python -m training.SCRIPT`: bad arguments or data end with the reason and exit code 2."""
    try:
        main_fn(parser.parse_args())
    except ValueError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        sys.exit(2)
