"""Caption every image in a folder: one JSON line per image; resumable; sharded under torchrun.

    python -m training.caption_folder photos/ --out captions.jsonl [--model DIR] [--overlays DIR]
    torchrun --nproc_per_node=4 -m training.caption_folder photos/ --out captions.jsonl

Each line of OUT.jsonl is `{"path": "<path relative to IN_DIR>", "caption": str, "score": float,
"finished": bool}` (score: the beam's log-probability of the caption; finished: false when the
caption was cut at --max-length before the model ended it), or `{"path": ..., "error": str}` for
a file with an image suffix that does not decode. Error lines make a rerun skip those files too;
pass --retry-errors to try them again. Images are the files with an image suffix directly in IN_DIR,
or under it with --recursive.

Resuming: a rerun first consolidates what earlier runs left (OUT.jsonl and any OUT.jsonl.part<r>):
a torn last line from a kill is dropped, duplicates are merged, and only images without a line
are captioned. Lines are appended a batch at a time, flushed and fsynced. Under torchrun, rank r
captions files[r::N] of the sorted list into OUT.jsonl.part<r>; after a barrier rank 0 merges the
parts into OUT.jsonl (atomically, sorted by path) and removes them. A kill at any moment, in
either mode, loses at most the batches in flight.

--overlays DIR writes one PNG strip per captioned image, DIR/<relative path>.png (e.g.
`cats/1.jpg` -> `DIR/cats/1.jpg.png`): the image, then one attention heatmap per word with the
word under it (none for a model without attention). An image gets its strip before its line, so a
resumed run never leaves a captioned image without one.

--coco-results FILE writes the captions in the COCO results format, `[{"image_id", "caption"}]`.
The ids are the file stems when every image has a distinct numeric stem (000000139.jpg -> 139),
otherwise every image's 1-based position in the sorted file list.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

from captioner.caption.captioner import Captioner
from captioner.data.images import list_images
from captioner.files import write_json_atomic, write_text_atomic
from captioner.image import ImageError, load_image
from captioner.overlay import attention_overlay
from captioner.paths import DEFAULT_CAPTION_MODEL
from captioner.progress import progress
from captioner.results import CaptionResult
from training.common import (
    Dist,
    barrier,
    batches,
    cleanup_distributed,
    run_script,
    setup_distributed,
)

STRIP_HEIGHT = 128  # pixels of each panel of an overlay strip, without its label
LABEL_HEIGHT = 14

# -- the output file and its parts ---------------------------------------------------------------


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}")


def part_files(out: Path) -> list[Path]:
    """OUT.jsonl.part<r> files left in OUT's folder, by rank."""
    pattern = re.compile(re.escape(out.name) + r"\.part(\d+)$")
    if not out.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.parent.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def _parse(line: bytes) -> dict[str, Any] | None:
    """A finished record, or None for a torn or foreign line."""
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
        return None
    if isinstance(rec.get("caption"), str) or isinstance(rec.get("error"), str):
        return rec
    return None


def read_records(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a JSON-lines file, and whether it holds anything else (a torn line, a last
    line without its newline, a line that is not a record)."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    lines = data.split(b"\n")
    dirty = bool(lines[-1])  # a last line without "\n" may be cut short, even if it parses
    records = [rec for line in lines[:-1] if line.strip() and (rec := _parse(line)) is not None]
    dirty = dirty or len(records) != sum(1 for line in lines[:-1] if line.strip())
    return records, dirty


def consolidate(out: Path, retry_errors: bool = False) -> dict[str, dict[str, Any]]:
    """Merge OUT.jsonl and any part files into OUT.jsonl: one line per path (a caption wins over
    an error, else the first), torn lines dropped, error lines dropped with `retry_errors`; the
    parts are removed. OUT.jsonl is rewritten (atomically, sorted by path) only when needed.
    Returns path -> record."""
    parts = part_files(out)
    merged: dict[str, dict[str, Any]] = {}
    rewrite = bool(parts)
    for source in [out, *parts]:
        records, dirty = read_records(source)
        rewrite |= dirty
        for rec in records:
            old = merged.get(rec["path"])
            if old is None or ("error" in old and "caption" in rec):
                merged[rec["path"]] = rec
            rewrite |= old is not None
    if retry_errors:
        errors = [p for p, rec in merged.items() if "error" in rec]
        for p in errors:
            del merged[p]
        rewrite |= bool(errors)
    if rewrite:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, "".join(_line(merged[p]) for p in sorted(merged)))
        for p in parts:
            p.unlink(missing_ok=True)
    return merged


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


def append_records(f, records: Iterable[dict[str, Any]]) -> None:
    """Whole lines in one write, flushed to disk before the next batch starts."""
    f.write("".join(_line(r) for r in records))
    f.flush()
    os.fsync(f.fileno())


# -- captioning ----------------------------------------------------------------------------------


def overlay_strip(image: Image.Image, result: CaptionResult) -> Image.Image:
    """The image, then one attention heatmap per word, each panel labelled with its word."""
    assert result.attention is not None
    width = max(1, round(image.width * STRIP_HEIGHT / image.height))
    base = image.resize((width, STRIP_HEIGHT), Image.Resampling.BILINEAR)
    panels = [base] + [attention_overlay(base, a) for a in result.attention]
    labels = [""] + result.tokens
    strip = Image.new("RGB", (width * len(panels), STRIP_HEIGHT + LABEL_HEIGHT), (255, 255, 255))
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    for k, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        strip.paste(panel, (k * width, 0))
        draw.text((k * width + 2, STRIP_HEIGHT + 1), label, fill=(0, 0, 0), font=font)
    return strip


def caption_files(
    captioner: Captioner,
    root: Path,
    files: Sequence[Path],
    beam_size: int = 3,
    max_length: int = 20,
    overlays: Path | None = None,
) -> list[dict[str, Any]]:
    """One record per file, in order: its caption, score and whether it was finished, or why it
    did not decode."""
    by_path: dict[Path, dict[str, Any]] = {}
    decoded: list[tuple[Path, Image.Image]] = []
    for f in files:
        try:
            decoded.append((f, load_image(f)))
        except ImageError as exc:
            by_path[f] = {"path": f.relative_to(root).as_posix(), "error": str(exc)}
    images = [im for _, im in decoded]
    results = captioner.caption(images, beam_size=beam_size, max_length=max_length)
    for (f, image), result in zip(decoded, results, strict=True):
        rel = f.relative_to(root).as_posix()
        if overlays is not None and result.attention is not None:
            target = overlays / f"{rel}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            overlay_strip(image, result).save(tmp, format="PNG")
            os.replace(tmp, target)
        by_path[f] = {
            "path": rel,
            "caption": result.caption,
            "score": round(result.score, 6),
            "finished": result.finished,
        }
    return [by_path[f] for f in files]


def coco_results(records: dict[str, dict[str, Any]], paths: Sequence[str]) -> list[dict]:
    """COCO results for the captioned ones of `paths` (the sorted listing); ids as the module
    docstring says."""
    stems = [Path(p).stem for p in paths]
    numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    ids = [int(s) for s in stems] if numeric else list(range(1, len(paths) + 1))
    return [
        {"image_id": i, "caption": records[p]["caption"]}
        for i, p in zip(ids, paths, strict=True)
        if "caption" in records.get(p, {})
    ]


def _total(values: list[int], d: Dist) -> list[int]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=d.device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


# -- the script ----------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("in_dir", type=Path, help="folder of images")
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file to write (appended)")
    p.add_argument(
        "--model",
        default=str(DEFAULT_CAPTION_MODEL),
        help="captioner model folder (default: the demo captioner)",
    )
    p.add_argument("--beam-size", type=int, default=3, help="beam width (default 3)")
    p.add_argument("--max-length", type=int, default=20, help="most words per caption (default 20)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    p.add_argument("--overlays", type=Path, help="write a per-word attention strip per image here")
    p.add_argument("--coco-results", type=Path, help="also write COCO-format results here")
    p.add_argument("--retry-errors", action="store_true", help="retry files that failed before")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def caption_shard(
    captioner: Captioner, root: Path, files: Sequence[Path], target: Path, args, show: bool
) -> tuple[int, int]:
    """Caption `files` a batch at a time, appending whole lines to `target`; returns how many
    were captioned and how many did not decode."""
    new_captions = new_errors = 0
    steps = (len(files) + args.batch_size - 1) // args.batch_size
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as f:
        for batch in progress(batches(list(files), args.batch_size), steps, "caption", show):
            records = caption_files(
                captioner, root, batch, args.beam_size, args.max_length, args.overlays
            )
            append_records(f, records)
            for rec in records:
                if "error" in rec:
                    print(f"caption_folder: skipped {rec['path']}: {rec['error']}", file=sys.stderr)
            new_errors += sum("error" in r for r in records)
            new_captions += sum("caption" in r for r in records)
    return new_captions, new_errors


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Caption what is missing from `args.out`; returns (and prints, on rank 0) a summary."""
    started = time.monotonic()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    root, out = args.in_dir, args.out
    files = list_images(root, recursive=args.recursive)
    if args.overlays is not None:  # never caption our own overlays on a recursive rerun
        skip = args.overlays.resolve()
        files = [f for f in files if not f.resolve().is_relative_to(skip)]
    paths = [f.relative_to(root).as_posix() for f in files]
    d = setup_distributed(args.device)
    try:
        captioner = Captioner.load(args.model, device=d.device)
        if args.overlays is not None and not captioner.model.decoder.config.attention and d.is_main:
            print("caption_folder: the model has no attention; no overlays", file=sys.stderr)
        if d.is_main:
            consolidate(out, retry_errors=args.retry_errors)
        barrier(d)  # every rank now reads one clean OUT.jsonl and no part files
        done = {rec["path"] for rec in read_records(out)[0]}
        mine = [f for f, p in list(zip(files, paths))[d.rank :: d.world_size] if p not in done]
        target = part_path(out, d.rank) if d.enabled else out
        counts = caption_shard(
            captioner, root, mine, target, args, d.is_main and not args.no_progress
        )
        new_captions, new_errors = _total(list(counts), d)
        barrier(d)  # every part is complete
        if not d.is_main:
            return {}
        records = consolidate(out)
        if args.coco_results is not None:
            write_json_atomic(args.coco_results, coco_results(records, paths))
        listed = [records[p] for p in paths if p in records]
        summary = {
            "images": len(files),
            "captioned": sum("caption" in r for r in listed),
            "errors": sum("error" in r for r in listed),
            "new_captions": new_captions,
            "new_errors": new_errors,
            "out": str(out),
            "seconds": round(time.monotonic() - started, 1),
        }
        print(json.dumps(summary))
        return summary
    finally:
        if d.enabled:
            cleanup_distributed()


if __name__ == "__main__":
    run_script(main, get_args_parser(), "caption_folder")
