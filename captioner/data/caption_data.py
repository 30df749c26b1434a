"""Caption datasets through the one data path: COCO captions JSON (+ image folder), Karpathy's split
file, or a plain folder of images. Missing and unreadable images are counted and skipped up front,
so an epoch never crashes half-way.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.data.images import ImageTensors
from captioner.vocab import Vocabulary


@dataclass
class CaptionRecord:
    image_id: int
    path: Path
    captions: list[str]


@dataclass
class CaptionSet:
    records: list[CaptionRecord]
    skipped_missing: int = 0
    skipped_unreadable: list[str] = field(default_factory=list)

    def references(self) -> dict[int, list[str]]:
        return {r.image_id: r.captions for r in self.records}

    def __len__(self) -> int:
        return len(self.records)


def _read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object")
    return data


def load_coco_captions(captions_json: str | Path, image_dir: str | Path) -> CaptionSet:
    """MS-COCO captions (`images` + `annotations` with `image_id` and `caption`), read with pycocotools."""
    data = _read_json(captions_json, "captions")
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"captions file {captions_json} needs 'images' and 'annotations' lists (COCO format)"
        )
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ValueError(f"image folder not found: {image_dir}")
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"captions file {captions_json} is not COCO format: missing {exc}"
            ) from exc
    records, missing = [], 0
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        path = image_dir / str(info.get("file_name", ""))
        if not info.get("file_name") or not path.is_file():
            missing += 1
            continue
        caps = [
            str(a["caption"]).strip()
            for a in coco.imgToAnns.get(image_id, [])
            if str(a.get("caption", "")).strip()
        ]
        if caps:
            records.append(CaptionRecord(int(image_id), path, caps))
    return CaptionSet(records, skipped_missing=missing)


def load_karpathy(split_json: str | Path, image_root: str | Path, split: str) -> CaptionSet:
    """Karpathy's `dataset_coco.json`; split `train` includes `restval`, as in his code."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    data = _read_json(split_json, "Karpathy split")
    if not isinstance(data.get("images"), list):
        raise ValueError(f"{split_json} needs an 'images' list (Karpathy's dataset_coco.json)")
    wanted = {"train", "restval"} if split == "train" else {split}
    root = Path(image_root)
    records, missing = [], 0
    for i, item in enumerate(data["images"]):
        if item.get("split") not in wanted:
            continue
        path = root / item.get("filepath", "") / item.get("filename", "")
        if not path.is_file():
            missing += 1
            continue
        caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in item.get("sentences", [])]
        records.append(
            CaptionRecord(
                int(item.get("cocoid", item.get("imgid", i))), path, [c for c in caps if c]
            )
        )
    return CaptionSet(records, skipped_missing=missing)


def drop_unreadable(captions: CaptionSet, images: ImageTensors) -> CaptionSet:
    """The caption records whose images decoded, in the same order as `images.data`."""
    records = [captions.records[i] for i in images.kept]
    return CaptionSet(
        records, captions.skipped_missing, captions.skipped_unreadable + images.unreadable
    )


def encode_captions(texts: Sequence[str], vocab: Vocabulary, max_tokens: int) -> torch.Tensor:
    """`<start> words <end>` id rows padded with `<pad>`; words beyond `max_tokens` are cut."""
    rows = [vocab.encode(t)[1:-1][:max_tokens] for t in texts]
    width = max(map(len, rows), default=0) + 2
    out = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, : len(ids) + 2] = torch.tensor([vocab.start_id, *ids, vocab.end_id])
    return out
