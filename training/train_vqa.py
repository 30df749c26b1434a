"""Train a VQA model (question LSTM + question-guided attention, or the no-attention baseline).

    python -m training.make_shapes --out /work/data/shapes --train 8000 --val 500 --test 1000
    python -m training.train_vqa --data /work/data/shapes --out runs/shapes-vqa --epochs 20
    python -m training.make_easy_vqa --out /work/data/easy-vqa
    python -m training.train_vqa --data /work/data/easy-vqa --val-split none --out runs/easy
    torchrun --nproc_per_node=2 -m training.train_vqa --data /work/data/shapes --out runs/ddp

Data are VQA v2 splits (questions.json, annotations.json, images/) under --data. Images are decoded
once into memory, and a step takes a batch of *images* with all their questions, so the encoder
runs once per image however many questions it has. The run folder gets `args.json`,
`metrics.jsonl` (one line per epoch), and the model folders `best/` (highest validation accuracy)
and `last/` (with optimizer state, for `--resume`).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from captioner.checkpoint import check_state_dict, load_model_dir, load_tensors, save_model_dir
from captioner.encoder import EncoderConfig
from captioner.files import write_json_atomic
from captioner.vocab import Vocabulary
from captioner.vqa import ANSWERS, QUESTION_VOCAB, VQAModel, encode_questions
from captioner.vqa_data import VQASplit, build_answer_vocab, load_vqa, soft_targets
from captioner.vqa_model import VQANet
from training.common import (
    Dist,
    EarlyStopping,
    MetricsLog,
    autocast,
    barrier,
    batches,
    cleanup_distributed,
    epoch_order,
    load_encoder_from,
    load_optimizer_state,
    optimizer_state,
    progress,
    recover_for_resume,
    resume_args,
    seed_everything,
    setup_distributed,
    warmup_cosine,
)
from training.evaluate_vqa import PreparedSplit, prepare, score

RESUME_OVERRIDES = ("max_minutes", "device", "epochs", "patience", "no_progress")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data", help="folder of VQA v2 splits: DATA/<split>/... (required unless --resume)"
    )
    data.add_argument("--train-split", default="train")
    data.add_argument(
        "--val-split", default="val", help="validation split under --data; 'none' for no validation"
    )
    data.add_argument("--answers", type=int, default=1000, help="classify over the top-K answers")
    data.add_argument("--min-count", type=int, default=1, help="rarer question words become <unk>")
    data.add_argument("--max-question-tokens", type=int, default=30)

    model = p.add_argument_group("model")
    model.add_argument(
        "--encoder",
        default="small_cnn",
        help="resnet18..152, vgg16/19, efficientnet_lite0, small_cnn",
    )
    model.add_argument("--input-size", type=int, default=128)
    model.add_argument(
        "--grid-size", type=int, default=8, help="pool the grid to this side (0: native)"
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
    model.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    model.add_argument("--embed-dim", type=int, default=128)
    model.add_argument("--hidden-dim", type=int, default=256)
    model.add_argument("--attention-dim", type=int, default=128)
    model.add_argument("--fusion-dim", type=int, default=512)
    model.add_argument("--glimpses", type=int, default=2)
    model.add_argument("--no-attention", action="store_true", help="the pooled-image baseline")
    model.add_argument("--stacked", action="store_true", help="each glimpse sees the ones before")
    model.add_argument("--coords", action="store_true", help="append each cell's (x, y)")
    model.add_argument(
        "--question-attention", action="store_true", help="each glimpse weighs the question words"
    )
    model.add_argument(
        "--relative", action="store_true", help="glimpses after the first score offsets from it"
    )
    model.add_argument("--positional", action="store_true", help="learned embedding per cell")
    model.add_argument("--count", action="store_true", help="feed each glimpse's sigmoid mass")
    model.add_argument("--no-normalize", action="store_true", help="skip the L2 norm per cell")
    model.add_argument("--dropout", type=float, default=0.1)
    model.add_argument("--name", default=None, help="model name (default: the run folder's name)")
    model.add_argument("--version", default="1")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=64, help="images per step (all questions)")
    opt.add_argument("--lr", type=float, default=2e-3)
    opt.add_argument("--encoder-lr", type=float, default=None, help="default: --lr")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--clip", type=float, default=5.0, help="gradient norm clipping (0: off)")
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")

    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder")
    run.add_argument(
        "--resume", action="store_true", help="continue from OUT/last with the run's own arguments"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument(
        "--patience",
        type=int,
        default=0,
        help="epochs without a better val accuracy (0: never stop)",
    )
    run.add_argument("--save-every", type=int, default=0, help="also save last/ every N steps")
    run.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long")
    run.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    run.add_argument("--no-progress", action="store_true")
    return p


# -- data ----------------------------------------------------------------------------------------


def load_split(root: Path, name: str) -> VQASplit:
    folder = root / name
    if not folder.is_dir():
        raise ValueError(f"split folder not found: {folder}")
    return load_vqa(folder / "questions.json", folder / "annotations.json", folder / "images")


class TrainTensors:
    """Question ids, image rows and sparse soft targets of a prepared training split."""

    def __init__(self, data: PreparedSplit, vocab: Vocabulary, answers: list[str], max_tokens: int):
        index = {a: i for i, a in enumerate(answers)}
        items = data.split.items
        targets = [soft_targets(item.answers, index) for item in items]
        width = max((len(t) for t in targets), default=1) or 1
        self.target_index = torch.zeros(len(items), width, dtype=torch.long)  # (N, K)
        self.target_score = torch.zeros(len(items), width)  # (N, K), 0 where padded
        for k, t in enumerate(targets):
            self.target_index[k, : len(t)] = torch.tensor(list(t.keys()), dtype=torch.long)
            self.target_score[k, : len(t)] = torch.tensor(list(t.values()))
        self.unanswerable = sum(1 for t in targets if not t)
        self.questions = encode_questions([item.question for item in items], vocab, max_tokens)
        self.num_answers = len(answers)
        self.by_image = data.by_image

    def batch(self, image_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(questions (Q, T), image_index (Q,) into `image_rows`, dense targets (Q, A))."""
        qs = [k for r in image_rows for k in self.by_image[r]]
        local = torch.tensor([j for j, r in enumerate(image_rows) for _ in self.by_image[r]])
        questions = self.questions[qs]
        questions = questions[:, : int((questions != 0).sum(1).max())]
        targets = torch.zeros(len(qs), self.num_answers)
        targets.scatter_add_(1, self.target_index[qs], self.target_score[qs])
        return questions, local, targets


def build_model(args, vocab: Vocabulary, answers: list[str]) -> VQANet:
    pretrained = args.encoder_weights is not None
    fine_tune = (
        args.fine_tune_blocks if args.fine_tune_blocks is not None else (0 if pretrained else 99)
    )
    encoder = EncoderConfig(
        name=args.encoder,
        input_size=args.input_size,
        grid_size=args.grid_size,
        weights=args.encoder_weights,
        fine_tune_blocks=fine_tune,
        width=args.encoder_width,
    )
    return VQANet.build(
        encoder,
        question_vocab_size=len(vocab),
        num_answers=len(answers),
        embed_dim=args.embed_dim,
        hidden_dim=args.hidden_dim,
        cell=args.cell,
        attention=not args.no_attention,
        glimpses=args.glimpses,
        attention_dim=args.attention_dim,
        fusion_dim=args.fusion_dim,
        positional=args.positional,
        coords=args.coords,
        count=args.count,
        stacked=args.stacked,
        question_attention=args.question_attention,
        relative=args.relative,
        normalize=not args.no_normalize,
        dropout=args.dropout,
        pad_id=vocab.pad_id,
    )


def make_optimizer(model: VQANet, args) -> torch.optim.Optimizer:
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": head, "lr": args.lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": args.encoder_lr or args.lr})
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


# -- checkpoints ---------------------------------------------------------------------------------


def save_last(
    vqa: VQAModel, run: Path, optimizer, scheduler, trainer: dict, training: dict
) -> None:
    tensors, meta = optimizer_state(optimizer)
    tensors["__rng_cpu__"] = torch.get_rng_state()
    if vqa.device.type == "cuda":
        tensors["__rng_cuda__"] = torch.cuda.get_rng_state(vqa.device)
    files = {
        **vqa.files(training),
        "trainer.json": {**trainer, "optimizer": meta, "scheduler": scheduler.state_dict()},
    }
    save_model_dir(
        run / "last",
        vqa.config(),
        vqa.model.state_dict(),
        files,
        tensors={"optimizer.safetensors": tensors},
    )


def restore_last(run: Path, model: VQANet, optimizer, scheduler) -> dict:
    _, weights, side = load_model_dir(
        run / "last", "vqa", required=("trainer.json", "optimizer.safetensors")
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


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every weight and buffer, to check that DDP ranks (or resumed runs) agree."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- training ------------------------------------------------------------------------------------


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Train; returns {"step", "epoch", "metrics", "best", "weights_sha256", "model"} on every rank."""
    run = Path(args.out)
    if args.resume:  # the run's own values, unless given again on this command line
        args = resume_args(args, argv, given_again=RESUME_OVERRIDES)
    if not args.data:
        raise ValueError("--data is required (the folder of VQA v2 splits)")
    if args.threads:
        torch.set_num_threads(args.threads)
    d = setup_distributed(args.device)
    try:
        return _train(args, d, run, argv)
    finally:
        cleanup_distributed()


def _train(args, d: Dist, run: Path, argv: list[str] | None) -> dict:
    started = time.monotonic()
    seed_everything(args.seed + d.rank)
    show = d.is_main and not args.no_progress
    root = Path(args.data)
    train_split = load_split(root, args.train_split)
    if not train_split.items:
        raise ValueError(f"no training questions with images in {root / args.train_split}")
    restart = False
    if args.resume and not recover_for_resume(run, d, "train_vqa"):
        args.resume, restart = False, True
    if args.resume:
        side = load_model_dir(run / "last", "vqa", (ANSWERS, QUESTION_VOCAB))[2]
        vocab = Vocabulary.from_json(side[QUESTION_VOCAB])
        answers = side[ANSWERS]["answers"]
    else:
        vocab = Vocabulary.build((i.question for i in train_split.items), args.min_count)
        answers = build_answer_vocab(train_split.items, args.answers)
    model = build_model(args, vocab, answers)
    encoder_source = None
    if args.init_encoder and not args.resume:
        encoder_source = load_encoder_from(model.encoder, args.init_encoder)
    model = model.to(d.device)
    vqa = VQAModel(model, vocab, answers, args.name or run.name, args.version, device=d.device)
    model.train()

    train = prepare(train_split, args.input_size, show)
    tensors = TrainTensors(train, vocab, answers, args.max_question_tokens)
    val = None
    if args.val_split != "none" and d.is_main:
        val = prepare(load_split(root, args.val_split), args.input_size)

    # A frozen encoder gives the same features every epoch: compute them once.
    features = None
    if model.encoder.frozen:
        with torch.inference_mode():
            features = torch.cat(
                [
                    model.encoder(train.images.batch(idx, d.device))[0].cpu()
                    for idx in batches(list(range(train.num_images)), 64)
                ]
            )

    optimizer = make_optimizer(model, args)
    steps_per_epoch = math.ceil(math.ceil(train.num_images / d.world_size) / args.batch_size)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * args.epochs, args.warmup_steps)
    early = EarlyStopping(args.patience)
    step, epoch, skip = 0, 0, 0
    log = MetricsLog(run, enabled=d.is_main)
    if args.resume:
        trainer = restore_last(run, model, optimizer, scheduler)
        step, epoch, skip = trainer["step"], trainer["epoch"], trainer["batch_in_epoch"]
        early = EarlyStopping(args.patience, trainer["early"]["best"], trainer["early"]["bad"])
        log.truncate_after(step, epoch)
    elif d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        if restart:
            log.truncate_after(0)  # lines the killed run logged before its first save
        write_json_atomic(run / "args.json", vars(args))

    command = "python -m training.train_vqa " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    training = {
        "command": command,
        "args": vars(args),
        "seed": args.seed,
        "data": {
            "root": str(root),
            "train": args.train_split,
            "val": None if args.val_split == "none" else args.val_split,
            "train_images": train.num_images,
            "train_questions": len(train.split.items),
            "answers": len(answers),
            "unanswerable_train_questions": tensors.unanswerable,
            "skipped_missing_image": train_split.skipped_missing_image,
            "skipped_unreadable_image": len(train.unreadable),
        },
        "encoder_init": encoder_source,
        "metrics": None,
        "world_size": d.world_size,
        "device": str(d.device),
        "torch": torch.__version__,
    }
    net = DistributedDataParallel(model) if d.enabled else model
    last_metrics: dict = {}
    stop, loss = False, None
    while epoch < args.epochs and not stop:
        order = epoch_order(train.num_images, args.seed, epoch, d)
        bar = progress(
            batches(order, args.batch_size, skip),
            total=steps_per_epoch - skip,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            enabled=show,
        )
        seen, t0 = 0, time.monotonic()
        for batch_in_epoch, rows in enumerate(bar, start=skip):
            questions, local, targets = tensors.batch(rows)
            inputs = (
                features[rows].to(d.device)
                if features is not None
                else train.images.batch(rows, d.device)
            )
            with autocast(d.device, args.amp):
                _, loss = net(
                    inputs, questions.to(d.device), local.to(d.device), targets.to(d.device)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(questions)
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                q_s=f"{seen * d.world_size / (time.monotonic() - t0):.0f}",
            )
            out_of_time = args.max_minutes and (time.monotonic() - started) > args.max_minutes * 60
            if (args.save_every and step % args.save_every == 0) or out_of_time:
                trainer = {
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch + 1,
                    "early": early.state(),
                }
                if d.is_main:
                    save_last(vqa, run, optimizer, scheduler, trainer, training)
            if _broadcast_flag(bool(out_of_time), d):
                stop = True
                break
        if stop:
            break
        epoch, skip = epoch + 1, 0
        record = {
            "epoch": epoch,
            "loss": loss.item() if loss is not None else None,
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        improved = True
        if val is not None:
            metrics = score(vqa, val)
            record.update(
                val_accuracy=metrics["accuracy"],
                per_answer_type=metrics["per_answer_type"],
                per_question_type=metrics["per_question_type"],
            )
            improved = early.update(metrics["accuracy"])
            last_metrics = {"split": args.val_split, **metrics}
        if d.is_main:
            log.log(step, record)
            training["metrics"] = {"epoch": epoch, **(last_metrics or {"loss": record["loss"]})}
            training["wall_time_s"] = round(time.monotonic() - started, 1)
            if improved:
                vqa.save(run / "best", training=training)
            trainer = {"step": step, "epoch": epoch, "batch_in_epoch": 0, "early": early.state()}
            save_last(vqa, run, optimizer, scheduler, trainer, training)
        stop = _broadcast_flag(early.should_stop, d)
        barrier(d)
    if d.enabled:  # BatchNorm statistics of the last step are each rank's own: take rank 0's
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    return {
        "step": step,
        "epoch": epoch,
        "metrics": last_metrics,
        "best": early.best,
        "weights_sha256": weights_digest(model),
        "model": model,
    }


def _broadcast_flag(flag: bool, d: Dist) -> bool:
    """Rank 0's flag on every rank (clocks differ, so a time budget must be decided once)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ValueError as exc:
        print(f"train_vqa: error: {exc}", file=sys.stderr)
        sys.exit(2)
