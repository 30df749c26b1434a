"""A captioner scored on a COCO-format split: what `training.evaluate` writes and what training
validates with, so the two never drift apart.

    results, unreadable = caption_split(captioner, data, beam_size=3)
    metrics = score(captioner, results, data.references(), read_objects("objects.json"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captioner.caption.captioner import Captioner
from captioner.data.caption_data import CaptionSet
from captioner.data.images import ImageTensors
from captioner.evaluation.coco import COCO_METRICS, coco_scores, leave_one_out
from captioner.evaluation.grounding import (
    count_accuracy,
    grounding,
    invented_relations,
    object_scene_accuracy,
    relation_accuracy,
)
from captioner.image import ImageError, load_image
from captioner.progress import progress
from captioner.results import CaptionResult


def caption_split(
    captioner: Captioner,
    data: CaptionSet,
    beam_size: int = 3,
    max_length: int = 20,
    batch_size: int = 32,
    show_progress: bool = False,
    images: ImageTensors | None = None,
) -> tuple[dict[int, CaptionResult], list[str]]:
    """Caption every image of `data` with the batched beam search, a batch of images at a time.

    Images are read from their files, or taken from `images` when the split is already decoded
    (row i is `data.records[i]`, as `drop_unreadable` leaves them). Returns image id -> result,
    and "path: reason" for the images that did not decode."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if images is not None and len(images) != len(data.records):
        raise ValueError(f"{len(images)} decoded images for {len(data.records)} records")
    results: dict[int, CaptionResult] = {}
    unreadable: list[str] = []
    starts = range(0, len(data.records), batch_size)
    for start in progress(starts, len(starts), "caption", show_progress):
        rows = list(range(start, min(start + batch_size, len(data.records))))
        if images is not None:
            records = [data.records[i] for i in rows]
            features = captioner.encode(images.batch(rows, captioner.device))
        else:
            records, decoded = [], []
            for i in rows:
                try:
                    decoded.append(load_image(data.records[i].path))
                except ImageError as exc:
                    unreadable.append(f"{data.records[i].path}: {exc}")
                    continue
                records.append(data.records[i])
            if not records:
                continue
            features = captioner.encode(captioner.preprocess(decoded))
        outputs = captioner.caption_features(features, beam_size=beam_size, max_length=max_length)
        for record, result in zip(records, outputs, strict=True):
            results[record.image_id] = result
    return results, unreadable


def read_objects(path: str | Path) -> dict[int, list[dict[str, Any]]]:
    """objects.json of the shapes world: image id -> its objects (shape, color, size, mask, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"objects file not found: {path}")
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        return {int(im["image_id"]): im["objects"] for im in images}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a shapes objects.json: {exc}") from exc


def score(
    captioner: Captioner,
    results: dict[int, CaptionResult],
    references: dict[int, list[str]],
    objects: dict[int, list[dict[str, Any]]] | None = None,
    meteor: bool = True,
    ptb_tokenize: bool = True,
) -> dict[str, Any]:
    """Every figure of METRICS.json that depends on the captions: the COCO scores, the
    references' leave-one-out ceiling and, given the shapes `objects`, grounding,
    object/scene accuracy, relation and count accuracy."""
    candidates = {k: r.caption for k, r in results.items()}
    scores = coco_scores(references, candidates, meteor=meteor, ptb_tokenize=ptb_tokenize)
    metrics: dict[str, Any] = {k: scores.get(k) for k in COCO_METRICS}  # METEOR None if skipped
    loo = leave_one_out({k: references[k] for k in candidates}, ptb_tokenize=ptb_tokenize)
    metrics.update(ref_loo_Bleu_4=loo["Bleu_4"], ref_loo_CIDEr=loo["CIDEr"])
    if objects is not None:
        missing = [k for k in candidates if k not in objects]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) have no entry in the objects, e.g. {missing[0]}"
            )
        if captioner.model.decoder.config.attention:
            metrics.update(grounding(results, objects, captioner.model.grid_hw))
        else:  # nothing to ground: the decoder never attends
            metrics.update(grounding=None, grounding_uniform=None, grounded_words=None)
        metrics.update(object_scene_accuracy(candidates, objects))
        metrics.update(relation_accuracy(candidates, objects))
        metrics.update(invented_relations(candidates, objects))
        metrics.update(count_accuracy(candidates, objects))
    return metrics
