"""Train a captioner (Show, Attend and Tell or the no-attention baseline) on COCO-format captions.

    python -m training.make_shapes --out data/shapes --train 6000 --val 500 --test 0 --seed 1
    python -m training.train_captioner --data data/shapes --out runs/shapes --epochs 10
    torchrun --nproc_per_node=2 -m training.train_captioner --data data/shapes --out runs/ddp

The run folder gets `args.json`, `metrics.jsonl` (one line per validation), and the model folders
`best/` (highest validation metric) and `last/` (with optimizer state, for `--resume`).

`--resume` continues from `last/` with the run's own arguments (`--epochs`, `--patience` and
`--device` given again replace them; `--stop-after-steps` and `--max-minutes` apply to this
invocation only). After a kill it picks up the last complete `last/` (saved every `--save-every`
steps and at each epoch end); a run killed before its first save starts again from step 0.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from captioner.checkpoint import load_model_dir, load_tensors
from captioner.datasets import (
    CaptionSet,
    ImageTensors,
    drop_unreadable,
    encode_captions,
    load_coco_captions,
    load_karpathy,
)
from captioner.encoder import EncoderConfig
from captioner.files import write_json_atomic
from captioner.model import CaptionModel
from captioner.pipeline import Captioner
from captioner.vocab import Vocabulary
from training.common import (
    Dist,
    EarlyStopping,
    MetricsLog,
    autocast,
    barrier,
    batches,
    cleanup_distributed,
    epoch_order,
    grouped_epoch_order,
    load_optimizer_state,
    optimizer_state,
    progress,
    recover_for_resume,
    resume_args,
    seed_everything,
    setup_distributed,
    warmup_cosine,
)

# On --resume: these come from this command line; the rest from the run's args.json, except the
# RESUME_OPTIONAL ones given again on this command line.
RESUME_OVERRIDES = ("resume", "max_minutes", "stop_after_steps", "no_progress")
RESUME_OPTIONAL = ("device", "epochs", "patience")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", help="a make_shapes-style folder: DATA/train and DATA/val")
    data.add_argument("--train-captions", help="COCO captions JSON for training")
    data.add_argument("--train-images", help="image folder for --train-captions")
    data.add_argument("--val-captions", help="COCO captions JSON for validation")
    data.add_argument("--val-images", help="image folder for --val-captions")
    data.add_argument("--val-objects", help="objects.json of the validation split (shapes data)")
    data.add_argument("--karpathy", help="Karpathy's dataset_coco.json (uses its train/val splits)")
    data.add_argument("--image-root", help="root of the image paths in --karpathy")
    data.add_argument(
        "--min-count", type=int, default=1, help="words seen fewer times become <unk>"
    )
    data.add_argument("--max-caption-tokens", type=int, default=24, help="longer captions are cut")
    data.add_argument(
        "--references",
        choices=("all", "first"),
        default="all",
        help="train on every reference or the first",
    )
    data.add_argument(
        "--group-by-image",
        action="store_true",
        help="keep each image's references together in the batches, so the encoder runs once "
        "per image instead of once per caption (a batch then holds ~batch-size/5 images)",
    )
    data.add_argument(
        "--val-limit", type=int, default=0, help="validate on at most this many images"
    )

    model = p.add_argument_group("model")
    model.add_argument(
        "--encoder",
        default="small_cnn",
        help="resnet18..152, vgg16/19, efficientnet_lite0, small_cnn",
    )
    model.add_argument("--input-size", type=int, default=128)
    model.add_argument(
        "--grid-size", type=int, default=0, help="adaptive-pool the grid to this side (0: native)"
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
    model.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    model.add_argument("--layers", type=int, default=1)
    model.add_argument("--embed-dim", type=int, default=128)
    model.add_argument("--hidden-dim", type=int, default=256)
    model.add_argument("--attention-dim", type=int, default=128)
    model.add_argument("--no-attention", action="store_true", help="Show and Tell style baseline")
    model.add_argument(
        "--positional", action="store_true", help="learned position embedding per grid cell"
    )
    model.add_argument("--dropout", type=float, default=0.3)
    model.add_argument(
        "--alpha-c", type=float, default=1.0, help="doubly stochastic attention weight"
    )
    model.add_argument("--name", default=None, help="model name (default: the run folder's name)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--lr", type=float, default=2e-3, help="decoder learning rate")
    opt.add_argument(
        "--encoder-lr", type=float, default=1e-3, help="learning rate of trained CNN blocks"
    )
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--clip", type=float, default=5.0, help="gradient norm clipping")
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument(
        "--scheduled-sampling",
        type=float,
        default=0.0,
        help="final probability of feeding the model's own word",
    )
    opt.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")

    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder")
    run.add_argument(
        "--resume", action="store_true", help="continue from OUT/last with the run's own arguments"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    run.add_argument("--early-stop-metric", default="CIDEr", help="CIDEr, Bleu_4 or scene_accuracy")
    run.add_argument(
        "--patience",
        type=int,
        default=0,
        help="validations without improvement before stopping (0: never)",
    )
    run.add_argument("--val-beam-size", type=int, default=1)
    run.add_argument("--save-every", type=int, default=0, help="also save last/ every N steps")
    run.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long")
    run.add_argument(
        "--stop-after-steps",
        type=int,
        default=0,
        help="stop (and save last/) at this step; resume later",
    )
    run.add_argument("--no-progress", action="store_true")
    return p


# -- data ----------------------------------------------------------------------------------------


def load_splits(args) -> tuple[CaptionSet, CaptionSet | None, Path | None]:
    if args.data:
        root = Path(args.data)
        args.train_captions = args.train_captions or str(root / "train" / "captions.json")
        args.train_images = args.train_images or str(root / "train" / "images")
        if (root / "val" / "captions.json").is_file():
            args.val_captions = args.val_captions or str(root / "val" / "captions.json")
            args.val_images = args.val_images or str(root / "val" / "images")
            if (root / "val" / "objects.json").is_file():
                args.val_objects = args.val_objects or str(root / "val" / "objects.json")
    if args.karpathy:
        if not args.image_root:
            raise ValueError("--karpathy needs --image-root")
        return (
            load_karpathy(args.karpathy, args.image_root, "train"),
            load_karpathy(args.karpathy, args.image_root, "val"),
            None,
        )
    if not (args.train_captions and args.train_images):
        raise ValueError("give --data, --karpathy, or --train-captions with --train-images")
    train = load_coco_captions(args.train_captions, args.train_images)
    val = load_coco_captions(args.val_captions, args.val_images) if args.val_captions else None
    if val is not None and args.val_limit:
        val.records = val.records[: args.val_limit]
    return train, val, Path(args.val_objects) if args.val_objects else None


def build_model(args, vocab: Vocabulary) -> CaptionModel:
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
    return CaptionModel.build(
        encoder,
        vocab_size=len(vocab),
        embed_dim=args.embed_dim,
        hidden_dim=args.hidden_dim,
        attention_dim=args.attention_dim,
        attention=not args.no_attention,
        cell=args.cell,
        num_layers=args.layers,
        dropout=args.dropout,
        positional=args.positional,
        doubly_stochastic=args.alpha_c,
        pad_id=vocab.pad_id,
    )


def make_optimizer(model: CaptionModel, args) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": args.lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": args.encoder_lr})
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


# -- validation ----------------------------------------------------------------------------------


def validate(
    captioner: Captioner, images: ImageTensors, val: CaptionSet, objects_file: Path | None, args
) -> dict:
    """BLEU/CIDEr without Java (fast); on shapes data also object/scene accuracy and grounding."""
    from captioner.metrics import coco_scores, grounding, object_scene_accuracy

    captioner.model.eval()
    results = {}
    for idx in batches(list(range(len(images))), 64):
        feats = captioner.encode(images.batch(idx, captioner.device))
        hyps = captioner.caption_features(feats, beam_size=args.val_beam_size)
        for i, r in zip(idx, hyps, strict=True):
            results[val.records[i].image_id] = r
    candidates = {k: r.caption for k, r in results.items()}
    refs = {r.image_id: r.captions for r in val.records}
    scores = coco_scores(refs, candidates, meteor=False, ptb_tokenize=False)
    if objects_file is not None:
        listed = json.loads(objects_file.read_text())["images"]
        objects = {o["image_id"]: o["objects"] for o in listed if o["image_id"] in results}
        scores.update(object_scene_accuracy(candidates, objects))
        if captioner.model.decoder.attend is not None:
            g = grounding(results, objects, captioner.model.grid_hw)
            scores["grounding"] = g["grounding"]
    captioner.model.train()
    return scores


# -- checkpoints ---------------------------------------------------------------------------------


def save_last(
    captioner: Captioner, run: Path, optimizer, scheduler, trainer: dict, training: dict
) -> None:
    tensors, meta = optimizer_state(optimizer)
    tensors["__rng_cpu__"] = torch.get_rng_state()
    if torch.cuda.is_available() and captioner.device.type == "cuda":
        tensors["__rng_cuda__"] = torch.cuda.get_rng_state(captioner.device)
    trainer = {**trainer, "optimizer": meta, "scheduler": scheduler.state_dict()}
    from captioner.checkpoint import save_model_dir

    files = {
        "vocab.json": captioner.vocab.to_json(),
        "training.json": training,
        "trainer.json": trainer,
    }
    save_model_dir(
        run / "last",
        captioner.config(),
        captioner.model.state_dict(),
        files,
        tensors={"optimizer.safetensors": tensors},
    )


def restore_last(run: Path, model: CaptionModel, optimizer, scheduler) -> dict:
    from captioner.checkpoint import check_state_dict

    _, weights, side = load_model_dir(
        run / "last", "captioner", required=("trainer.json", "optimizer.safetensors")
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


# -- training ------------------------------------------------------------------------------------


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Train; returns the final `step`, `epoch`, last validation `metrics`, `best` value and `model`."""
    run = Path(args.out)
    if args.resume:
        args = resume_args(args, argv, always=RESUME_OVERRIDES, given_again=RESUME_OPTIONAL)
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
    train_set, val_set, objects_file = load_splits(args)
    if len(train_set) == 0:
        raise ValueError("no training images found (check --train-captions / --train-images)")
    show = d.is_main and not args.no_progress
    restart = False
    if args.resume and not recover_for_resume(run, d, "train_captioner"):
        args.resume, restart = False, True
    if args.resume:
        vocab = Vocabulary.from_json(
            load_model_dir(run / "last", "captioner", ("vocab.json",))[2]["vocab.json"]
        )
    else:
        vocab = Vocabulary.build(
            (c for r in train_set.records for c in r.captions), min_count=args.min_count
        )
    model = build_model(args, vocab).to(d.device)
    name = args.name or run.name
    captioner = Captioner(model, vocab, name=name, version="1", device=d.device)

    train_images = ImageTensors(
        [r.path for r in train_set.records], args.input_size, progress if show else None
    )
    train_set = drop_unreadable(train_set, train_images)
    pairs = [
        (i, j)
        for i, r in enumerate(train_set.records)
        for j in range(1 if args.references == "first" else len(r.captions))
    ]
    texts = [train_set.records[i].captions[j] for i, j in pairs]
    groups: list[list[int]] = [[] for _ in train_set.records]  # each image's pair indices
    for k, (i, _) in enumerate(pairs):
        groups[i].append(k)
    caption_ids = encode_captions(texts, vocab, args.max_caption_tokens)
    val_images = None
    if val_set is not None and d.is_main:
        val_images = ImageTensors([r.path for r in val_set.records], args.input_size)
        val_set = drop_unreadable(val_set, val_images)

    # A frozen encoder gives the same features every epoch: compute them once.
    features = None
    if model.encoder.frozen:
        with torch.inference_mode():
            features = torch.cat(
                [
                    model.encoder(train_images.batch(idx, d.device))[0].cpu()
                    for idx in batches(list(range(len(train_images))), 64)
                ]
            )

    optimizer = make_optimizer(model, args)
    steps_per_epoch = math.ceil(math.ceil(len(pairs) / d.world_size) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    scheduler = warmup_cosine(optimizer, total_steps, args.warmup_steps)
    early = EarlyStopping(args.patience)
    step, epoch, skip = 0, 0, 0
    log = MetricsLog(run, enabled=d.is_main)
    if args.resume:
        trainer = restore_last(run, model, optimizer, scheduler)
        step, epoch, skip = trainer["step"], trainer["epoch"], trainer["batch_in_epoch"]
        early = EarlyStopping(args.patience, trainer["early"]["best"], trainer["early"]["bad"])
        log.truncate_after(step, epoch)
        if d.is_main:
            print(
                f"train_captioner: resuming from {run / 'last'} at step {step} "
                f"(epoch {epoch + 1}, batch {skip})",
                file=sys.stderr,
            )
    elif d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        if restart:
            log.truncate_after(0)  # lines the killed run logged before its first save
        write_json_atomic(run / "args.json", vars(args))

    command = "python -m training.train_captioner " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    training = {
        "command": command,
        "args": vars(args),
        "seed": args.seed,
        "data": {
            "train": args.train_captions or args.karpathy,
            "train_images": len(train_set),
            "train_pairs": len(pairs),
            "val": args.val_captions,
            "skipped_missing": train_set.skipped_missing,
            "skipped_unreadable": len(train_set.skipped_unreadable),
        },
        "metrics": None,
        "world_size": d.world_size,
        "device": str(d.device),
        "torch": torch.__version__,
    }
    net = DistributedDataParallel(model) if d.enabled else model
    model.train()
    last_metrics: dict = {}
    stop, loss = False, None
    while epoch < args.epochs and not stop:
        order = (
            grouped_epoch_order(groups, args.seed, epoch, d)
            if args.group_by_image
            else epoch_order(len(pairs), args.seed, epoch, d)
        )
        bar = progress(
            batches(order, args.batch_size, skip),
            total=steps_per_epoch - skip,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            enabled=show,
        )
        seen, t0 = 0, time.monotonic()
        for batch_in_epoch, idx in enumerate(bar, start=skip):
            # Each distinct image in the batch goes through the encoder once.
            images, image_index = torch.unique(
                torch.tensor([pairs[k][0] for k in idx]), return_inverse=True
            )
            caps = caption_ids[idx]
            caps = caps[:, : int((caps != vocab.pad_id).sum(1).max())].to(d.device)
            inputs = (
                features[images].to(d.device)
                if features is not None
                else train_images.batch(images.tolist(), d.device)
            )
            sample_prob = args.scheduled_sampling * min(1.0, step / max(1, total_steps))
            with autocast(d.device, args.amp):
                _, loss = net(inputs, caps, sample_prob, image_index.to(d.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(idx)
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                img_s=f"{seen * d.world_size / (time.monotonic() - t0):.0f}",
            )
            out_of_time = bool(
                args.max_minutes and (time.monotonic() - started) > args.max_minutes * 60
            )
            out_of_time |= bool(args.stop_after_steps and step >= args.stop_after_steps)
            if (args.save_every and step % args.save_every == 0) or out_of_time:
                trainer = {
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch + 1,
                    "early": early.state(),
                }
                if d.is_main:
                    save_last(captioner, run, optimizer, scheduler, trainer, training)
            if out_of_time:
                stop = True
                break
        if stop:
            break
        _sync_buffers(model, d)
        epoch, skip = epoch + 1, 0
        record = {
            "epoch": epoch,
            "loss": loss.item() if loss is not None else None,
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": time.monotonic() - started,
        }
        improved = True
        if d.is_main and val_images is not None:
            metrics = validate(captioner, val_images, val_set, objects_file, args)
            record.update(metrics)
            if args.early_stop_metric not in metrics:
                raise ValueError(
                    f"--early-stop-metric {args.early_stop_metric!r} is not among {sorted(metrics)}"
                )
            improved = early.update(metrics[args.early_stop_metric])
            last_metrics = metrics
        if d.is_main:
            log.log(step, record)
            training["metrics"] = {"epoch": epoch, **(last_metrics or {"loss": record["loss"]})}
            training["wall_time_s"] = round(time.monotonic() - started, 1)
            if improved:
                captioner.save(run / "best", training=training)
            trainer = {"step": step, "epoch": epoch, "batch_in_epoch": 0, "early": early.state()}
            save_last(captioner, run, optimizer, scheduler, trainer, training)
        stop = _broadcast_flag(early.should_stop, d)
        barrier(d)
    return {
        "step": step,
        "epoch": epoch,
        "metrics": last_metrics,
        "best": early.best,
        "model": model,
    }


def _sync_buffers(model: torch.nn.Module, d: Dist) -> None:
    """DDP broadcasts BatchNorm statistics before each forward, so after the last step every rank
    holds its own; take rank 0's so all ranks (and the saved model) agree."""
    if d.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _broadcast_flag(flag: bool, d: Dist) -> bool:
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


if __name__ == "__main__":
    main(get_args_parser().parse_args())
