"""Shapes-world caption figures: attention grounding and object/scene accuracy, read with the
world's grammar.

    grounding(results, objects, (7, 7))       # share of colour/shape words attended on their object
    object_scene_accuracy(candidates, objects)
    relation_accuracy(candidates, objects)    # two-object scenes: both named and placed right
    count_accuracy(candidates, objects)       # scenes with twins: counted, not listed one by one
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from captioner.data.shapes import (
    COLOUR_WORDS,
    COUNT_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    ShapeObject,
    decode_mask,
    parse_caption,
    relation,
    score_caption,
    stated_relation,
)


class AttendedCaption(Protocol):
    """What grounding reads from a caption result (`captioner.results.CaptionResult` fits)."""

    tokens: list[str]
    attention: np.ndarray | None  # (len(tokens), h, w)


def cell_bounds(i: int, n: int, size: int) -> tuple[int, int]:
    """Pixel range [start, stop) of cell i of n along an axis of `size` pixels."""
    return math.floor(i * size / n), math.ceil((i + 1) * size / n)


def cells_overlapping(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: which grid cells hold at least one pixel of the (H, W) mask."""
    h, w = grid_hw
    H, W = mask.shape
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        r0, r1 = cell_bounds(i, h, H)
        for j in range(w):
            c0, c1 = cell_bounds(j, w, W)
            out[i, j] = mask[r0:r1, c0:c1].any()
    return out


def object_cells(
    objects: Sequence[Mapping[str, Any]],
    grid_hw: tuple[int, int],
    image_size: tuple[int, int] | None = None,
) -> list[np.ndarray]:
    """Per object, the (h, w) cells its mask overlaps; `image_size` (H, W), when given, is
    checked against every mask."""
    out = []
    for obj in objects:
        mask = decode_mask(obj["mask"])
        if image_size is not None and mask.shape != tuple(image_size):
            raise ValueError(
                f"object mask is {mask.shape}, expected image_size {tuple(image_size)}"
            )
        out.append(cells_overlapping(mask, grid_hw))
    return out


def word_cells(
    objects: Sequence[Mapping[str, Any]],
    grid_hw: tuple[int, int],
    image_size: tuple[int, int] | None,
    overlaps: Sequence[np.ndarray] | None = None,
) -> dict[tuple[str, str], np.ndarray]:
    """("color"|"shape", value) -> (h, w) cells overlapping any object with that value;
    `overlaps`, each object's cells (`object_cells`), when the caller already has them."""
    if overlaps is None:
        overlaps = object_cells(objects, grid_hw, image_size)
    cells: dict[tuple[str, str], np.ndarray] = {}
    for obj, overlap in zip(objects, overlaps, strict=True):
        for key in (("color", obj["color"]), ("shape", obj["shape"])):
            cells[key] = cells[key] | overlap if key in cells else overlap
    return cells


def word_key(token: str) -> tuple[str, str] | None:
    """("color"|"shape", value) for a colour or shape word (plurals included), else None."""
    if token in COLOUR_WORDS:
        return ("color", COLOUR_WORDS[token])
    if token in SHAPE_WORDS:
        return ("shape", SHAPE_WORDS[token])
    return None


def attention_targets(
    tokens: Sequence[str],
    objects: Sequence[Mapping[str, Any]],
    grid_hw: tuple[int, int],
    counts: bool = False,
    each_copy: bool = False,
) -> np.ndarray:
    """(len(tokens), h * w) bool: for each colour or shape word, the grid cells that `grounding`
    counts as right (those overlapping an object with that colour or shape); no cell for the
    other words, or for a word no object of the scene matches. With `counts`, the count words'
    cells too (`count_targets`, `each_copy` as there: then uint8, 1 for a word's cells), from the
    same decoded masks."""
    h, w = grid_hw
    overlaps = object_cells(objects, grid_hw)
    cells = word_cells(objects, grid_hw, None, overlaps)
    out = np.zeros((len(tokens), h * w), dtype=np.uint8 if counts and each_copy else bool)
    for t, token in enumerate(tokens):
        key = word_key(token)
        if key is not None and key in cells:
            out[t] = cells[key].reshape(-1)
    if counts:
        out |= _count_rows(tokens, objects, overlaps, grid_hw, each_copy)
    return out


def count_targets(
    tokens: Sequence[str],
    objects: Sequence[Mapping[str, Any]],
    grid_hw: tuple[int, int],
    each_copy: bool = False,
) -> np.ndarray:
    """(len(tokens), h * w) bool: for each count word ("a", "two", "pair": `COUNT_WORDS`), the
    grid cells of every object its phrase names, the phrase running to the next count word: the
    objects with the size, colour and shape it states ("two small red circles", "three squares in
    blue": those it leaves out match any). No cell for a count word whose phrase names no colour
    or shape ("a picture of ..."), for one no object matches, or for the other words. The step
    that writes a count then looks at every copy it counts.

    With `each_copy`, uint8 bit sets instead: bit c of a cell is set when it belongs to the
    phrase's c-th object (in the scene's order; from the 8th on, bit 7), so that a loss can ask
    for attention on each copy (`supervised_attention_loss`) rather than on any of them."""
    return _count_rows(tokens, objects, object_cells(objects, grid_hw), grid_hw, each_copy)


def _count_rows(
    tokens: Sequence[str],
    objects: Sequence[Mapping[str, Any]],
    overlaps: Sequence[np.ndarray],
    grid_hw: tuple[int, int],
    each_copy: bool = False,
) -> np.ndarray:
    """`count_targets` from each object's cells (`object_cells`)."""
    cells = [o.reshape(-1) for o in overlaps]
    out = np.zeros((len(tokens), grid_hw[0] * grid_hw[1]), dtype=np.uint8 if each_copy else bool)
    starts = [t for t, token in enumerate(tokens) if token in COUNT_WORDS]
    for start, end in zip(starts, [*starts[1:], len(tokens)]):
        phrase = tokens[start + 1 : end]
        named = dict(k for k in map(word_key, phrase) if k is not None)
        if not named:
            continue
        named.update(("size", SIZE_WORDS[t]) for t in phrase if t in SIZE_WORDS)
        copies = [
            overlap
            for obj, overlap in zip(objects, cells, strict=True)
            if all(obj[kind] == value for kind, value in named.items())
        ]
        for c, overlap in enumerate(copies):  # from the 8th copy on, they share the last bit
            out[start] |= (overlap.astype(np.uint8) << min(c, 7)) if each_copy else overlap
    return out


def grounding(
    results: Mapping[Hashable, AttendedCaption],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
    grid_hw: tuple[int, int],
    image_size: tuple[int, int] | None = None,
) -> dict[str, float | int | None]:
    """How often the attention that produced a colour or shape word peaks on a matching object.

    For each generated colour word (shape word, plurals included), take the attention map of
    that step; the word is grounded when its highest-weight grid cell overlaps at least one mask
    pixel of an object with that colour (shape). Cell (i, j) of an h x w grid covers image rows
    [floor(i*H/h), ceil((i+1)*H/h)) and columns [floor(j*W/w), ceil((j+1)*W/w)) of the H x W
    image: the encoder sees the whole image squashed to a square, so cells map proportionally
    (neighbouring cells share a border pixel row when h does not divide H).

    `grounding_uniform` is the same figure for uniform attention, where every cell ties: its
    expected value, the share of cells that overlap a matching object, averaged over the same
    words. `image_size` (H, W), when given, is checked against every mask. Returns `grounding`,
    `grounding_uniform` (None when no colour or shape word was generated) and `grounded_words`,
    the number of words counted."""
    h, w = grid_hw
    hits, uniform, n = 0, 0.0, 0
    for image_id, result in results.items():
        words = [(t, key) for t, token in enumerate(result.tokens) if (key := word_key(token))]
        if not words:
            continue
        if result.attention is None:
            raise ValueError(f"image {image_id!r}: grounding needs attention maps, got None")
        attention = np.asarray(result.attention)
        if attention.shape != (len(result.tokens), h, w):
            raise ValueError(
                f"image {image_id!r}: attention shape {attention.shape}, expected "
                f"{(len(result.tokens), h, w)} (tokens x grid)"
            )
        if image_id not in objects_by_image:
            raise ValueError(f"image {image_id!r} has no objects in objects_by_image")
        cells = word_cells(objects_by_image[image_id], grid_hw, image_size)
        for t, key in words:
            match = cells.get(key, np.zeros((h, w), dtype=bool))
            peak = np.unravel_index(int(np.argmax(attention[t])), (h, w))
            hits += bool(match[peak])
            uniform += float(match.mean())
            n += 1
    return {
        "grounding": hits / n if n else None,
        "grounding_uniform": uniform / n if n else None,
        "grounded_words": n,
    }


def object_scene_accuracy(
    captions: Mapping[Hashable, str],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
) -> dict[str, float]:
    """Read each caption with the shapes grammar (`shapes.score_caption`): `object_accuracy` is
    the share of all objects whose size, colour and shape a caption states correctly;
    `scene_accuracy` the share of captions stating every object and nothing else."""
    if not captions:
        raise ValueError("no captions to score")
    missing = [k for k in captions if k not in objects_by_image]
    if missing:
        raise ValueError(f"{len(missing)} caption(s) have no objects, e.g. image {missing[0]!r}")
    correct = total = scenes = 0
    for image_id, text in captions.items():
        objects = objects_by_image[image_id]
        n, scene_ok = score_caption(text, objects)
        correct += n
        total += len(objects)
        scenes += scene_ok
    return {
        "object_accuracy": correct / total if total else 0.0,
        "scene_accuracy": scenes / len(captions),
    }


def _distinct_pairs(
    captions: Mapping[Hashable, str],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
) -> Iterator[tuple[str, ShapeObject, ShapeObject, int]]:
    """(caption, object, other object, image width) of each scene of exactly two distinct
    objects (not two copies of one)."""
    for image_id, text in captions.items():
        objects = objects_by_image[image_id]
        if len(objects) != 2:
            continue
        a, b = (_shape_object(o) for o in objects)
        if a.attrs != b.attrs:
            yield text, a, b, int(objects[0]["mask"]["size"][1])  # scenes are square


def relation_accuracy(
    captions: Mapping[Hashable, str],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
) -> dict[str, float | int | None]:
    """In the scenes of two distinct objects with a clear relation (`shapes.relation`), the share
    of captions that name both objects right (size, colour, shape, one each) and state where the
    first lies from the second ("to the left of", "above", "on the right and ...": any of the
    grammar's forms, read by `shapes.stated_relation`). Returns `relation_accuracy` (None when
    no scene qualifies) and `relation_scenes`, how many scenes were counted."""
    correct = scenes = 0
    for text, a, b, size in _distinct_pairs(captions, objects_by_image):
        if relation(a, b, size) is None:
            continue
        scenes += 1
        mentions = parse_caption(text)
        if len(mentions) != 2 or any(m.count != 1 for m in mentions):
            continue
        said = [(m.size, m.color, m.shape) for m in mentions]
        if sorted(said, key=str) != sorted([a.attrs, b.attrs], key=str):
            continue
        first, second = (a, b) if said[0] == a.attrs else (b, a)
        correct += stated_relation(text) == relation(first, second, size)
    return {
        "relation_accuracy": correct / scenes if scenes else None,
        "relation_scenes": scenes,
    }


def invented_relations(
    captions: Mapping[Hashable, str],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
) -> dict[str, float | int | None]:
    """The other side of `relation_accuracy`: in the scenes of two distinct objects whose relation
    is not clear cut (`shapes.relation` is None, so every reference joins them with "and"), the
    share of captions that state a relation anyway ("to the left of", "above", ...). A model that
    states a relation for every pair scores well on `relation_accuracy` and badly here. Returns
    `invented_relations` (None when no scene qualifies) and `unclear_relation_scenes`."""
    invented = scenes = 0
    for text, a, b, size in _distinct_pairs(captions, objects_by_image):
        if relation(a, b, size) is not None:
            continue
        scenes += 1
        invented += stated_relation(text) is not None
    return {
        "invented_relations": invented / scenes if scenes else None,
        "unclear_relation_scenes": scenes,
    }


def count_accuracy(
    captions: Mapping[Hashable, str],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
) -> dict[str, float | int | None]:
    """In the scenes where an object repeats (two or more of the same size, colour and shape),
    the share of captions that state the scene right and count each repeated object in one
    phrase ("two small red circles", "a pair of ..."), as every reference does, instead of
    naming it once per copy ("a small red circle, a small red circle"), which scene accuracy
    accepts. Returns `count_accuracy` (None when no scene qualifies) and `count_scenes`."""
    correct = scenes = 0
    for image_id, text in captions.items():
        objects = objects_by_image[image_id]
        attrs = [(o["size"], o["color"], o["shape"]) for o in objects]
        if len(set(attrs)) == len(attrs):
            continue
        scenes += 1
        said = [(m.size, m.color, m.shape) for m in parse_caption(text)]
        correct += score_caption(text, objects)[1] and len(said) == len(set(said))
    return {
        "count_accuracy": correct / scenes if scenes else None,
        "count_scenes": scenes,
    }


def _shape_object(record: Mapping[str, Any]) -> ShapeObject:
    """An object of objects.json as the shapes world's `ShapeObject` (radius unknown: unused)."""
    x, y = record["center"]
    return ShapeObject(record["shape"], record["color"], record["size"], (int(x), int(y)), 0.0)
