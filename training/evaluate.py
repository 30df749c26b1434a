"""Score a captioner on a COCO-format split: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap), the
references' own leave-one-out ceiling and, on shapes-world data, attention grounding and
object/scene accuracy.

    python -m training.evaluate --model models/shapes-captioner --captions DATA/test/captions.json \\
        --images DATA/test/images --objects DATA/test/objects.json --out METRICS.json \\
        --results RESULTS.json

METRICS.json keys: `Bleu_1`..`Bleu_4`, `METEOR` (null with --no-meteor or --no-java), `ROUGE_L`,
`CIDEr`, `ref_loo_Bleu_4`, `ref_loo_CIDEr`; with --objects also `grounding`, `grounding_uniform`,
`grounded_words` (null for a model without attention), `object_accuracy`, `scene_accuracy`,
`relation_accuracy` and `relation_scenes` (two distinct objects with a clear relation: both named
right and placed right), `invented_relations` and `unclear_relation_scenes` (two distinct objects
without a clear relation: the share of captions that state one anyway), `count_accuracy` and
`count_scenes` (scenes where an object repeats: the scene stated right with each repeated object
counted in one phrase, "two small red circles", not named once per copy); and
`n_images`, `beam_size`, `max_length`, `model`, `data`, `skipped_missing_images`,
`skipped_unreadable_images`, `notes`, `seconds`. SPICE is not computed (see `notes`).
The results file is the COCO results format, `[{"image_id": int, "caption": str}]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from captioner.caption.captioner import Captioner
from captioner.data.caption_data import CaptionSet, load_coco_captions
from captioner.evaluation.caption_scores import caption_split, read_objects, score
from captioner.evaluation.coco import SPICE_NOTE, java_available
from captioner.files import write_json_atomic
from training.common import run_script


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="captioner model folder")
    p.add_argument("--captions", required=True, help="COCO-format captions JSON of the split")
    p.add_argument("--images", required=True, help="image folder of the split")
    p.add_argument("--out", required=True, help="METRICS.json to write (atomically)")
    p.add_argument("--results", help="also write the captions here, in the COCO results format")
    p.add_argument("--objects", help="shapes-world objects.json: adds grounding and accuracy")
    p.add_argument("--beam-size", type=int, default=3, help="beam width (default 3)")
    p.add_argument("--max-length", type=int, default=20, help="most words per caption (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images (by image id)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java start is slow)")
    p.add_argument(
        "--no-java",
        action="store_true",
        help="no Java at all: skip METEOR and tokenize with the project's tokenizer, not PTB",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quantize", choices=["int8"], help="int8 LSTM and linear layers (CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    meteor, ptb = not (args.no_meteor or args.no_java), not args.no_java
    if (meteor or ptb) and not java_available():
        raise ValueError(
            "Java is not on PATH: install Java 17 (METEOR, PTB tokenizer) or --no-java"
        )
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    objects = read_objects(args.objects) if args.objects else None
    captioner = Captioner.load(args.model, device=args.device, quantize=args.quantize)
    data = load_coco_captions(args.captions, args.images)
    if args.limit is not None:
        data = CaptionSet(data.records[: args.limit], data.skipped_missing)
    if not data.records:
        raise ValueError(
            f"no images to evaluate: {args.captions} names none found in {args.images}"
        )
    print(SPICE_NOTE, file=sys.stderr)
    results, unreadable = caption_split(
        captioner, data, args.beam_size, args.max_length, args.batch_size, not args.no_progress
    )
    for line in unreadable:
        print(f"evaluate: skipped unreadable image {line}", file=sys.stderr)
    if not results:
        raise ValueError("no image of the split could be decoded")
    references = data.references()
    metrics = score(captioner, results, references, objects, meteor=meteor, ptb_tokenize=ptb)
    notes = {"SPICE": SPICE_NOTE}
    if not meteor:
        notes["METEOR"] = "skipped (--no-meteor or --no-java)"
    notes["tokenizer"] = "PTB (Stanford CoreNLP 3.4.1)" if ptb else "captioner.vocab.tokenize"
    metrics.update(
        n_images=len(results),
        beam_size=args.beam_size,
        max_length=args.max_length,
        model={"name": captioner.name, "version": captioner.version, "path": str(args.model)},
        data={"captions": str(args.captions), "images": str(args.images)},
        skipped_missing_images=data.skipped_missing,
        skipped_unreadable_images=len(unreadable),
        notes=notes,
        seconds=round(time.monotonic() - started, 1),
    )
    if args.results:
        coco = [{"image_id": k, "caption": r.caption} for k, r in results.items()]
        write_json_atomic(args.results, coco)
    write_json_atomic(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    run_script(main, get_args_parser(), "evaluate")
