"""Add domain statistics to an existing model folder, without retraining (see `captioner.domain`).

    python -m training.domain_stats --model models/shapes-captioner \\
        --images data/shapes-s1/train/images --holdout data/shapes-s1/val/images \\
        --description "synthetic shapes-world scenes: ..."

The pooled encoder features of up to --limit images of --images (the model's training images, or
more of its kind) give the mean and the shrunk covariance; the threshold is the --quantile of the
scores of --holdout (other images of the same domain, e.g. the validation split), or of a random
--holdout-share of --images when --holdout is not given. The folder gets `domain.safetensors` and
`domain.json` (replacing any there), atomically; the rest of it is left as it was. Training
(`training.loop`) writes the same files into every model folder it saves.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from captioner.caption.captioner import Captioner
from captioner.checkpoint import CONFIG, ModelDirError
from captioner.data.images import ImageTensors, list_images
from captioner.domain import DEFAULT_QUANTILE, DomainStats, sample_rows, split_holdout
from captioner.progress import progress
from captioner.vqa.answerer import Answerer
from training.common import batches, run_script


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="model folder (captioner or VQA) to add them to")
    p.add_argument("--images", required=True, help="folder of images of the model's domain")
    p.add_argument("--holdout", help="other images of the domain, for the threshold")
    p.add_argument(
        "--description",
        required=True,
        help="what the training images are, in plain words (shown when an image is unlike them)",
    )
    p.add_argument(
        "--limit", type=int, default=2500, help="use at most this many images of each folder"
    )
    p.add_argument(
        "--holdout-share",
        type=float,
        default=0.2,
        help="share of --images held out for the threshold when --holdout is not given",
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=DEFAULT_QUANTILE,
        help=f"the threshold is this quantile of the held-out scores (default {DEFAULT_QUANTILE})",
    )
    p.add_argument("--seed", type=int, default=0, help="which images --limit and the split take")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_model(path: str | Path, device: str) -> Captioner | Answerer:
    """The captioner or VQA model in folder `path`, as its config.json says."""
    config = Path(path) / CONFIG
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelDirError(f"cannot read the model kind from {config}: {exc}") from exc
    if kind == "captioner":
        return Captioner.load(path, device=device)
    if kind == "vqa":
        return Answerer.load(path, device=device, cache_size=0)
    raise ModelDirError(f"{config} has kind {kind!r}; expected 'captioner' or 'vqa'")


@torch.inference_mode()
def pooled_features(
    model: Captioner | Answerer, images: ImageTensors, rows: list[int], batch_size: int
) -> torch.Tensor:
    """The pooled encoder features (N, D) of `rows` of `images`, as the model computes them."""
    encoder = model.model.encoder.eval()
    return torch.cat(
        [
            encoder(images.batch(chunk, model.device))[1].float().cpu()
            for chunk in batches(rows, batch_size)
        ]
    )


def decode(folder: str, size: int, show: bool) -> ImageTensors:
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"no images found in {folder}")
    images = ImageTensors(paths, size, progress if show else None)
    if len(images) == 0:
        raise ValueError(f"none of the {len(paths)} images in {folder} could be decoded")
    return images


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Fit, save into --model, and return (and print) what domain.json now says."""
    started = time.monotonic()
    if args.limit < 2:
        raise ValueError(f"--limit must be >= 2, got {args.limit}")
    model = load_model(args.model, args.device)
    show = not args.no_progress
    images = decode(args.images, model.input_size, show)
    if args.holdout:
        held_images = decode(args.holdout, model.input_size, show)
        fit_rows = sorted(sample_rows(len(images), args.limit, args.seed))
        held_rows = sorted(sample_rows(len(held_images), args.limit, args.seed))
        fit = pooled_features(model, images, fit_rows, args.batch_size)
        held = pooled_features(model, held_images, held_rows, args.batch_size)
    else:
        fit_rows, held_rows = split_holdout(len(images), args.holdout_share, args.limit, args.seed)
        fit = pooled_features(model, images, fit_rows, args.batch_size)
        held = pooled_features(model, images, held_rows, args.batch_size)
    command = "python -m training.domain_stats " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    stats = DomainStats.fit(
        fit,
        held,
        args.description,
        args.quantile,
        {
            "source": "training.domain_stats",
            "images": str(args.images),
            "holdout": str(args.holdout)
            if args.holdout
            else f"a {args.holdout_share} share of images",
            "seed": args.seed,
            "command": command,
        },
    )
    stats.save(args.model)
    record = {**stats.json(), "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    run_script(main, get_args_parser(), "domain_stats")
