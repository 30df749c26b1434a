"""The domain check of the demo models: own test images against real photos, and its cost.

For each demo model (`models/shapes-captioner`, `models/shapes-vqa`, `models/easy-vqa`) it scores,
through the library (`Captioner.domain_scores`, `Answerer.encode_scored`):
- its own test images: for the shapes models a shapes split of a seed not used in training (seed 7,
  `test`, rendered in memory exactly as `python -m training.make_shapes --out DIR --train 0 --val 0
  --test 1000 --seed 7` writes them, or read from --shapes-images), for easy-vqa the easy-VQA test
  images inside the installed `easy-vqa` package (or --easy-vqa-images);
- the real photos of coco-mini (`../shared/data/coco-mini/images`, or --photos);
- the other synthetic world (shapes models on easy-VQA test images and easy-vqa on shapes scenes).

It prints the AUROC of own test images against photos (the chance that a photo scores above a test
image), the false alarms (own test images flagged out of domain), the shares flagged among photos
and the other world; then the latency of one request through the library (`caption` of one image
at beam 3, `answer` of one question with the feature cache off), with and without the check,
interleaved in the same run (each round runs both, back to back, in alternating order; the
overhead is the median of the rounds' differences over the median request without the check), and
the check's own cost (`DomainStats.scores` on one image's grid) against the request's; and
what the training loop's hook costs (`loop.domain_stats` on 2,000 of the demo captioner's training
scenes against one of its training steps).

    python bench/domain.py [--rounds 1000] [--photos DIR] [--shapes-images DIR] [--easy-vqa-images DIR]

Last line: {"models": {name: {...}}, "training_hook": {...}, "targets_met": bool}; targets: AUROC >= 0.99, false alarms
<= 1%, the check <= 5% of a request's latency (judged on its own cost, `check_share`: the paired
difference of whole requests, `measured_overhead`, is printed too but is noisier than the check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from captioner.caption.captioner import Captioner
from captioner.data.caption_data import encode_captions
from captioner.data.images import ImageTensors, list_images
from captioner.data.shapes import generate_split, render
from captioner.image import preprocess_batch
from captioner.paths import MODELS_DIR, REPO_ROOT
from captioner.vqa.answerer import Answerer
from training import loop
from training.make_shapes import first_id, split_seed

# each demo model: (what loads it, its own world)
MODELS = {
    "shapes-captioner": (Captioner, "shapes"),
    "shapes-vqa": (Answerer, "shapes"),
    "easy-vqa": (Answerer, "easy-vqa"),
}
QUESTION = {"shapes": "what color is the circle?", "easy-vqa": "what shape is in the image?"}
TARGETS = {"auroc": 0.99, "false_alarms": 0.01, "overhead": 0.05}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default=str(MODELS_DIR), help="folder of the demo models")
    p.add_argument(
        "--photos",
        default=str(REPO_ROOT.parent / "shared" / "data" / "coco-mini" / "images"),
        help="real photos (default: ../shared/data/coco-mini/images)",
    )
    p.add_argument(
        "--shapes-images", help="shapes test images (default: seed 7's test split, in memory)"
    )
    p.add_argument("--shapes-count", type=int, default=1000, help="scenes rendered in memory")
    p.add_argument(
        "--easy-vqa-images", help="easy-VQA test images (default: the installed package's)"
    )
    p.add_argument("--rounds", type=int, default=1000, help="timed requests per model and mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--training-images",
        type=int,
        default=2000,
        help="time the training loop's hook on this many training scenes (0: skip)",
    )
    return p


def load_folder(folder: Path, what: str, option: str) -> list[Image.Image]:
    if not folder.is_dir():
        sys.exit(f"bench/domain.py: {what} not found at {folder}; pass {option} DIR")
    paths = list_images(folder)
    if not paths:
        sys.exit(f"bench/domain.py: no images in {folder} ({what}); pass {option} DIR")
    return [Image.open(p).convert("RGB") for p in paths]


def shapes_images(args: argparse.Namespace) -> tuple[list[Image.Image], str]:
    if args.shapes_images:
        return load_folder(Path(args.shapes_images), "shapes test images", "--shapes-images"), (
            args.shapes_images
        )
    scenes = generate_split(args.shapes_count, split_seed(7, "test"), 128, first_id("test"))
    return [render(s) for s in scenes], f"shapes seed 7 test split, {args.shapes_count} scenes"


def easy_vqa_images(args: argparse.Namespace) -> tuple[list[Image.Image], str]:
    if args.easy_vqa_images:
        folder = Path(args.easy_vqa_images)
    else:
        try:
            folder = Path(str(resources.files("easy_vqa") / "data" / "test" / "images"))
        except ModuleNotFoundError:
            sys.exit(
                "bench/domain.py: the easy-vqa package is not installed; pass --easy-vqa-images"
            )
    return load_folder(folder, "easy-VQA test images", "--easy-vqa-images"), str(folder)


@torch.inference_mode()
def scores(model: Captioner | Answerer, images: list[Image.Image]) -> torch.Tensor:
    """Each image's domain score, through the model's own inference path."""
    out = []
    for start in range(0, len(images), 64):
        batch = preprocess_batch(images[start : start + 64], model.input_size)
        if isinstance(model, Captioner):
            out += model.domain_scores(model.encode(batch))
        else:
            out += model.encode_scored(batch)[1]
    return torch.tensor(out, dtype=torch.float64)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney statistic)."""
    above = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    return float(above + 0.5 * ties)


def latency(model: Captioner | Answerer, image: Image.Image, question: str, rounds: int) -> dict:
    """Medians of one library request with and without the check (ABBA-interleaved), and of
    the check alone on the request's own grid."""
    stats = model.domain

    def request() -> None:
        if isinstance(model, Captioner):
            model.caption([image], beam_size=3)
        else:
            model.answer([image], [question])

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(5):  # warm-up
        request()
    for r in range(rounds):
        for check in (True, False) if r % 2 == 0 else (False, True):
            model.domain = stats if check else None
            t0 = time.perf_counter()
            request()
            times[check].append(time.perf_counter() - t0)
    model.domain = stats
    with torch.inference_mode():
        grid = model.model.encoder(preprocess_batch([image], model.input_size))[0]  # (1, L, D)
    alone = []
    for _ in range(rounds * 10):
        t0 = time.perf_counter()
        stats.scores(grid)
        alone.append(time.perf_counter() - t0)
    with_ms, without_ms, score_ms = (
        statistics.median(x) * 1000 for x in (times[True], times[False], alone)
    )
    # Each round's two requests ran back to back: their difference cancels the machine's drift.
    paired = statistics.median(a - b for a, b in zip(times[True], times[False])) * 1000
    return {
        "request_with_check_ms": round(with_ms, 3),
        "request_without_check_ms": round(without_ms, 3),
        "measured_overhead": round(paired / without_ms, 4),
        "check_ms": round(score_ms, 4),
        "check_share": round(score_ms / without_ms, 5),
    }


def training_cost(folder: Path, count: int) -> dict:
    """What the training loop's hook costs: one `loop.domain_stats` pass (an encoder pass in eval
    mode over `count` training images, then the fit) against one training step of 64 caption
    pairs, with the demo captioner on seed 1's shapes training scenes (its own training data)."""
    captioner = Captioner.load(folder)
    scenes = generate_split(count, split_seed(1, "train"), 128, first_id("train"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for scene in scenes:
            paths.append(Path(tmp) / scene.file_name)
            render(scene).save(paths[-1])
        images = ImageTensors(paths, captioner.input_size)
    model = captioner.model.train()
    args = argparse.Namespace(domain_images=count + count // 4, seed=0, domain_description="x")
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        loop.domain_stats(model, images, None, args, torch.device("cpu"))
        passes.append(time.perf_counter() - t0)
    captions = encode_captions([s.captions[0] for s in scenes[:64]], captioner.vocab, 24)
    batch = images.batch(range(64))
    optimizer = torch.optim.AdamW(model.parameters())
    steps = []
    for _ in range(6):
        t0 = time.perf_counter()
        _, loss = model(batch, captions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append(time.perf_counter() - t0)
    one_pass, step = min(passes), statistics.median(steps[1:])
    epoch = step * 24000 / 64  # the demo captioner's recipe: 24,000 pairs an epoch
    return {
        "images": len(images),
        "domain_pass_s": round(one_pass, 2),
        "train_step_64_s": round(step, 3),
        "share_of_a_24000_pair_epoch": round(one_pass / epoch, 4),
    }


def main() -> None:
    args = get_args_parser().parse_args()
    torch.set_num_threads(args.threads)
    photos = load_folder(Path(args.photos), "real photos (coco-mini)", "--photos")
    shapes, shapes_source = shapes_images(args)
    easy, easy_source = easy_vqa_images(args)
    worlds = {"shapes": shapes, "easy-vqa": easy}
    print(f"photos: {len(photos)} from {args.photos}")
    print(
        f"shapes test: {len(shapes)} ({shapes_source}); easy-VQA test: {len(easy)} ({easy_source})"
    )
    report, met = {}, True
    for name, (kind, world) in MODELS.items():
        folder = Path(args.models) / name
        if not (folder / "config.json").is_file():
            sys.exit(f"bench/domain.py: no model folder at {folder}; pass --models DIR")
        # The VQA models without their feature cache: every request encodes its image.
        model = Captioner.load(folder) if kind is Captioner else Answerer.load(folder, cache_size=0)
        if model.domain is None:
            sys.exit(
                f"bench/domain.py: {folder} has no domain statistics; add them with "
                "python -m training.domain_stats (see README)"
            )
        other = "easy-vqa" if world == "shapes" else "shapes"
        own, photo, alien = (scores(model, x) for x in (worlds[world], photos, worlds[other]))
        t = model.domain.threshold
        row = {
            "threshold": round(t, 4),
            "own_test_images": len(own),
            "auroc_own_vs_photos": round(auroc(photo, own), 5),
            "false_alarms": round(float((own > t).double().mean()), 5),
            "photos_flagged": round(float((photo > t).double().mean()), 5),
            f"{other}_flagged": round(float((alien > t).double().mean()), 5),
            "own_max_score": round(float(own.max()), 4),
            "photos_min_score": round(float(photo.min()), 4),
        }
        row.update(latency(model, worlds[world][0], QUESTION[world], args.rounds))
        ok = (
            row["auroc_own_vs_photos"] >= TARGETS["auroc"]
            and row["false_alarms"] <= TARGETS["false_alarms"]
            and row["check_share"] <= TARGETS["overhead"]
        )
        met = met and ok
        print(
            f"{name:17s} AUROC {row['auroc_own_vs_photos']:.4f}  false alarms "
            f"{row['false_alarms']:.2%}  photos flagged {row['photos_flagged']:.0%}  {other} "
            f"flagged {row[f'{other}_flagged']:.1%}  threshold {t:.3f} (own max "
            f"{row['own_max_score']:.3f}, photos min {row['photos_min_score']:.3f})"
        )
        print(
            f"{'':17s} request {row['request_without_check_ms']:.2f} ms without the check, "
            f"{row['request_with_check_ms']:.2f} ms with (medians of {args.rounds}; median paired "
            f"difference {row['measured_overhead']:+.1%}); the check alone {row['check_ms'] * 1000:.0f} us = "
            f"{row['check_share']:.2%} of a request"
        )
        report[name] = row
    cost = None
    if args.training_images:
        cost = training_cost(Path(args.models) / "shapes-captioner", args.training_images)
        print(
            f"training hook: {cost['domain_pass_s']:.2f} s for the statistics of "
            f"{cost['images']} training images (shapes-captioner), a training step of 64 pairs "
            f"{cost['train_step_64_s']:.3f} s: {cost['share_of_a_24000_pair_epoch']:.1%} of an "
            "epoch of its 24,000-pair recipe"
        )
    print(
        json.dumps(
            {"models": report, "training_hook": cost, "targets": TARGETS, "targets_met": met}
        )
    )


if __name__ == "__main__":
    main()
