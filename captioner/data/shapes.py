"""The shapes world: synthetic scenes, their pictures, captions, questions and a caption scorer.

A scene holds 1 to 4 non-overlapping objects, each a shape, a colour and a size at a position. From a
seed it yields the same picture (PIL drawing on a dark, slightly noisy background), the same reference
captions (a small grammar: counts, synonyms, orderings, spatial relations) and the same questions
(colour, shape, count, existence, relation), each form in one wording (QUESTION_TEMPLATES, whose
words are QUESTION_WORDS; captioner.data.paraphrase rewords them). The caption parser reads the
grammar's words back, so evaluation can say which objects a caption states correctly.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from captioner.vocab import tokenize

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
RGB = {
    "red": (220, 50, 50),
    "green": (60, 190, 75),
    "blue": (60, 110, 245),
    "yellow": (240, 215, 50),
    "purple": (165, 80, 215),
    "white": (235, 235, 235),
}
MAX_OBJECTS = 4
MARGIN, GAP = 0.03, 0.04  # of the image size: an object's circle from the border, and from others
EDGE_RATIOS = (0.3, 0.7)  # make_edge_pair_scene: minor over major offset, either side of 0.5
MAX_CAPTION_TOKENS = 20
CAPTIONS_PER_IMAGE = 5
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024

# -- the grammar's words: every surface form maps back to one canonical value ----------------------

_PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
_SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}

SIZE_WORDS: dict[str, str] = {w: s for s, words in _SIZE_SYNONYMS.items() for w in words}
COLOUR_WORDS: dict[str, str] = {c: c for c in COLOURS}
SHAPE_WORDS: dict[str, str] = {**{s: s for s in SHAPES}, **{p: s for s, p in _PLURAL.items()}}
COUNT_WORDS: dict[str, int] = {
    "a": 1, "an": 1, "one": 1, "single": 1, "pair": 2,
    **{w: n for n, w in _NUMBER.items()}, **{str(n): n for n in _NUMBER},
}  # fmt: skip

_OPENERS = ("a picture of", "an image showing", "an image of", "a scene with", "a drawing of")
_JOIN_TWO = (" and ", " and ", " with ", " as well as ", " together with ")
_HORIZONTAL = (  # {a} is the left object, {b} the right one; True: a full sentence, no opener
    ("{a} to the left of {b}", False),
    ("{b} to the right of {a}", False),
    ("{a} is to the left of {b}", True),
    ("{b} is to the right of {a}", True),
    ("{a} on the left and {b} on the right", False),
    ("{b} on the right and {a} on the left", False),
    ("{a} left of {b}", False),
)
_VERTICAL = (  # {a} is the upper object
    ("{a} above {b}", False),
    ("{b} below {a}", False),
    ("{a} is above {b}", True),
    ("{b} is below {a}", True),
    ("{a} at the top and {b} at the bottom", False),
    ("{b} at the bottom and {a} at the top", False),
    ("{b} under {a}", False),
)

# -- the scene model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str  # "small" or "large"
    center: tuple[int, int]  # (x, y) in pixels
    radius: float  # of the circle the shape is drawn in

    @property
    def attrs(self) -> tuple[str, str, str]:
        return (self.size, self.color, self.shape)


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    question_type: str  # color | shape | count | exist | relation
    answer_type: str  # yes/no | number | other


@dataclass(frozen=True)
class Scene:
    image_id: int
    size: int  # images are size x size
    objects: tuple[ShapeObject, ...]  # left to right
    background: tuple[int, int, int]
    seed: int
    captions: tuple[str, ...]  # captions[0] is the canonical one
    questions: tuple[Question, ...]

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.png"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across runs and platforms (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def make_scene(seed: int, image_id: int = 1, size: int = 128) -> Scene:
    """One scene with its captions and questions, fully determined by `seed` and `size`."""
    _check_size(size)
    rng = random.Random(seed)
    objects = _place_objects(rng, _sample_attributes(rng), size)
    return _finish_scene(rng, objects, seed, image_id, size)


def make_edge_pair_scene(
    seed: int, image_id: int = 1, size: int = 128, ratios: tuple[float, float] = EDGE_RATIOS
) -> Scene:
    """A scene of two distinct objects placed near the edge of `relation`'s rule: the offset
    between their centres along the minor axis is drawn uniformly from `ratios` times the offset
    along the major one, so about half of these pairs have a clear relation (a ratio up to 0.5)
    and half do not. Training on them shows a model where the rule's edge lies; a random scene
    rarely lands near it. Fully determined by `seed`, `size` and `ratios`."""
    _check_size(size)
    lo, hi = ratios
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"edge ratios must satisfy 0 <= low < high <= 1, got {ratios}")
    rng = random.Random(seed)
    first = (rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES))
    second = first
    while second == first:
        second = (rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES))
    margin, gap = MARGIN * size, GAP * size
    for _ in range(1000):
        placed = [
            (sz, color, shape, _radius(rng, sz, size)) for sz, color, shape in (first, second)
        ]
        r1, r2 = placed[0][3], placed[1][3]
        far, ratio, horizontal = (
            rng.uniform(0.1, 0.8) * size,
            rng.uniform(lo, hi),
            rng.random() < 0.5,
        )
        major, minor = far * rng.choice((-1, 1)), ratio * far * rng.choice((-1, 1))
        x1 = rng.uniform(margin + r1, size - margin - r1)
        y1 = rng.uniform(margin + r1, size - margin - r1)
        x2, y2 = (x1 + major, y1 + minor) if horizontal else (x1 + minor, y1 + major)
        centres = [(round(x1), round(y1)), (round(x2), round(y2))]
        inside = all(
            margin + r <= c <= size - margin - r
            for (x, y), r in zip(centres, (r1, r2))
            for c in (x, y)
        )
        (ax, ay), (bx, by) = centres
        if inside and np.hypot(ax - bx, ay - by) >= r1 + r2 + gap:
            objects = [
                ShapeObject(shape, color, sz, c, round(r, 2))
                for (sz, color, shape, r), c in zip(placed, centres)
            ]
            objects.sort(key=lambda o: o.center)
            return _finish_scene(rng, tuple(objects), seed, image_id, size)
    raise RuntimeError(f"could not place an edge pair in a {size}px image")


def _finish_scene(
    rng: random.Random, objects: tuple[ShapeObject, ...], seed: int, image_id: int, size: int
) -> Scene:
    shade = rng.randint(20, 45)  # a dark grey, slightly tinted
    background = tuple(shade + rng.randint(-6, 6) for _ in range(3))
    captions = make_captions(objects, rng, size)
    questions = make_questions(objects, rng, size)
    return Scene(image_id, size, objects, background, seed, tuple(captions), tuple(questions))


def generate_split(n: int, seed: int, size: int = 128, start_id: int = 1) -> list[Scene]:
    """`n` scenes with ids `start_id`, `start_id + 1`, ...; scene i depends only on (seed, i)."""
    if n < 0:
        raise ValueError(f"number of scenes must be >= 0, got {n}")
    if start_id < 1:
        raise ValueError(f"start_id must be >= 1, got {start_id}")
    _check_size(size)
    return [make_scene(derive_seed(seed, i), start_id + i, size) for i in range(n)]


def _check_size(size: int) -> None:
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {size}")


def _sample_attributes(rng: random.Random) -> list[tuple[str, str, str]]:
    attrs: list[tuple[str, str, str]] = []
    for _ in range(rng.randint(1, MAX_OBJECTS)):
        if attrs and rng.random() < 0.2:  # repeat an object now and then, so counts are needed
            attrs.append(rng.choice(attrs))
        else:
            attrs.append((rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES)))
    return attrs


def _radius(rng: random.Random, size_word: str, size: int) -> float:
    """An object's circle radius in pixels: 7.5% (small) or 15% (large) of the image, within 8%."""
    return (0.075 if size_word == "small" else 0.15) * size * rng.uniform(0.92, 1.08)


def _place_objects(
    rng: random.Random, attrs: list[tuple[str, str, str]], size: int
) -> tuple[ShapeObject, ...]:
    """Rejection sampling: each object's circle keeps a margin from the border and the others."""
    margin, gap = MARGIN * size, GAP * size
    order = sorted(
        attrs, key=lambda a: a[0] != "large"
    )  # the large ones first: they fit less easily
    for _ in range(1000):
        placed: list[ShapeObject] = []
        for sz, color, shape in order:
            r = _radius(rng, sz, size)
            lo, hi = int(np.ceil(margin + r)), int(size - margin - r)
            for _ in range(100):
                x, y = rng.randint(lo, hi), rng.randint(lo, hi)
                if all(
                    np.hypot(x - o.center[0], y - o.center[1]) >= r + o.radius + gap for o in placed
                ):
                    placed.append(ShapeObject(shape, color, sz, (x, y), round(r, 2)))
                    break
            else:
                break
        if len(placed) == len(order):
            return tuple(sorted(placed, key=lambda o: o.center))
    raise RuntimeError(f"could not place {len(attrs)} objects in a {size}px image")


# -- rendering ------------------------------------------------------------------------------------


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: Any) -> None:
    (x, y), r = obj.center, obj.radius
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj.shape == "square":
        s = 0.8 * r
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif obj.shape == "triangle":  # pointing up, corners on the circle
        draw.polygon([(x, y - r), (x + 0.866 * r, y + 0.5 * r), (x - 0.866 * r, y + 0.5 * r)], fill)
    elif obj.shape == "diamond":  # taller than wide, so never a rotated square
        draw.polygon([(x, y - r), (x + 0.65 * r, y), (x, y + r), (x - 0.65 * r, y)], fill=fill)
    elif obj.shape == "cross":
        a, e = 0.3 * r, 0.95 * r
        draw.rectangle([x - e, y - a, x + e, y + a], fill=fill)
        draw.rectangle([x - a, y - e, x + a, y + e], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; allowed: {', '.join(SHAPES)}")


def render(scene: Scene) -> Image.Image:
    """The scene's RGB picture: shapes on a dark background, with slight pixel noise."""
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, RGB[obj.color])
    pixels = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(scene.seed).integers(-4, 5, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB")


def object_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """The object's pixels in a size x size image, drawn with the same geometry. (H, W) bool."""
    img = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(img), obj, 255)
    return np.asarray(img) > 0


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary (H, W) mask as COCO RLE: {"size": [h, w], "counts": str}, ready for JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """A COCO RLE (as in objects.json) back to an (H, W) bool mask."""
    with warnings.catch_warnings():
        # pycocotools 2.0.x under numpy 2 warns that its __array__ lacks `copy`; harmless here
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(dict(rle)).astype(bool)


# -- captions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """Objects that share size, colour and shape: stated together with a count."""

    size: str
    color: str
    shape: str
    members: tuple[ShapeObject, ...]

    @property
    def count(self) -> int:
        return len(self.members)


def _groups(objects: Sequence[ShapeObject]) -> list[_Group]:
    by_attrs: dict[tuple[str, str, str], list[ShapeObject]] = {}
    for obj in sorted(objects, key=lambda o: o.center):
        by_attrs.setdefault(obj.attrs, []).append(obj)
    return [_Group(*attrs, tuple(members)) for attrs, members in by_attrs.items()]


def relation(a: ShapeObject, b: ShapeObject, size: int) -> str | None:
    """Where `a` lies relative to `b`: left/right/above/below, or None when it is not clear cut
    (the centres must be apart by twice as much along one axis as along the other)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= 0.1 * size:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= 0.1 * size:
        return "above" if dy < 0 else "below"
    return None


def _noun_phrase(g: _Group, rng: random.Random | None, style: str = "pre") -> str:
    """E.g. "a small red circle", "two big squares in blue", "a red cross that is tiny".
    With `rng=None` the canonical form: "a"/number word, "small"/"large", attributes first."""
    noun = _PLURAL[g.shape] if g.count > 1 else g.shape
    size = rng.choice(_SIZE_SYNONYMS[g.size]) if rng else g.size
    det = "a" if g.count == 1 else _NUMBER[g.count]
    if rng and g.count == 1:
        det = rng.choice(("a", "a", "a", "a", "one", "a single"))
    elif rng and g.count == 2 and rng.random() < 0.25:
        det = "a pair of"
    if style == "in":
        return f"{det} {size} {noun} {rng.choice(('in', 'colored')) if rng else 'in'} {g.color}"
    if style == "that":
        return f"{det} {g.color} {noun} that {'is' if g.count == 1 else 'are'} {size}"
    return f"{det} {size} {g.color} {noun}"


def _join(rng: random.Random, phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return phrases[0] + rng.choice(_JOIN_TWO) + phrases[1]
    last = rng.choice((" and ", ", and ", " and ", " as well as "))
    return ", ".join(phrases[:-1]) + last + phrases[-1]


def canonical_caption(objects: Sequence[ShapeObject], size: int) -> str:
    """Deterministic: groups left to right, "to the left of"/"above" for two distinct objects."""
    groups = _groups(objects)
    phrases = [_noun_phrase(g, None) for g in groups]
    if len(groups) == 2 and len(objects) == 2:
        a, b = objects  # sorted by x
        rel = relation(a, b, size)
        if rel == "left":
            return f"{phrases[0]} to the left of {phrases[1]}"
        if rel in ("above", "below"):
            upper, lower = phrases if rel == "above" else phrases[::-1]
            return f"{upper} above {lower}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _random_caption(rng: random.Random, objects: Sequence[ShapeObject], size: int) -> str:
    groups = _groups(objects)
    style = rng.choice(("pre", "pre", "pre", "in", "that"))
    phrase = {id(g): _noun_phrase(g, rng, style) for g in groups}
    body, sentence = None, False
    if len(groups) == 2 and len(objects) == 2 and rng.random() < 0.75:
        a, b = groups
        rel = relation(a.members[0], b.members[0], size)
        if rel is not None:
            if rel in ("right", "below"):
                a, b = b, a
            template, sentence = rng.choice(_HORIZONTAL if rel in ("left", "right") else _VERTICAL)
            body = template.format(a=phrase[id(a)], b=phrase[id(b)])
    elif len(groups) == 1 and len(objects) == 2 and rng.random() < 0.5:
        rel = relation(*objects, size)
        if rel is not None:
            side = "side by side" if rel in ("left", "right") else "one above the other"
            body = f"{phrase[id(groups[0])]}{rng.choice((' ', ', '))}{side}"
    elif len(groups) == 3 and len(objects) == 3 and rng.random() < 0.5:
        a, b, c = objects  # sorted by x
        if relation(a, b, size) == "left" and relation(b, c, size) == "left":
            listed = _join(rng, [phrase[id(g)] for g in groups])
            body = rng.choice(("{} from left to right", "from left to right, {}")).format(listed)
    if body is None:
        body = _join(rng, [phrase[id(g)] for g in rng.sample(groups, len(groups))])
    opener, first = rng.random(), body.split()[0]
    if not sentence and opener < 0.25 and first in COUNT_WORDS:
        body = ("there is " if COUNT_WORDS[first] == 1 else "there are ") + body
    elif not sentence and opener < 0.6:
        body = f"{rng.choice(_OPENERS)} {body}"
    return body


def make_captions(
    objects: Sequence[ShapeObject], rng: random.Random, size: int, n: int = CAPTIONS_PER_IMAGE
) -> list[str]:
    """The canonical caption, then `n - 1` distinct random ones, each <= MAX_CAPTION_TOKENS tokens."""
    captions = [canonical_caption(objects, size)]
    for _ in range(100 * n):
        if len(captions) == n:
            return captions
        caption = _random_caption(rng, objects, size)
        if len(tokenize(caption)) <= MAX_CAPTION_TOKENS and caption not in captions:
            captions.append(caption)
    raise RuntimeError(f"the grammar gave fewer than {n} distinct captions for {objects}")


# -- reading captions back -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """One noun phrase of a caption: `count` objects with these attributes (None: not stated)."""

    count: int
    size: str | None
    color: str | None
    shape: str


def parse_caption(text: str) -> list[Mention]:
    """The noun phrases the grammar writes, in order. A phrase ends at its shape word; a size or
    colour word right after a phrase with nothing new begun ("a circle in red", "a red circle that
    is small") completes that phrase when it lacks the attribute."""
    mentions: list[Mention] = []
    count: int | None = None
    pending: dict[str, str] = {}
    for tok in tokenize(text):
        if tok in COUNT_WORDS:
            count = COUNT_WORDS[tok]
        elif tok in SIZE_WORDS or tok in COLOUR_WORDS:
            field, value = ("size", SIZE_WORDS[tok]) if tok in SIZE_WORDS else ("color", tok)
            last = mentions[-1] if mentions else None
            if count is None and not pending and last and getattr(last, field) is None:
                mentions[-1] = replace(last, **{field: value})
            else:
                pending[field] = value
        elif tok in SHAPE_WORDS:
            plural = tok != SHAPE_WORDS[tok]
            n = count if count is not None else (2 if plural else 1)
            mentions.append(Mention(n, pending.get("size"), pending.get("color"), SHAPE_WORDS[tok]))
            count, pending = None, {}
    return mentions


# The grammar's relation words, read after the first noun phrase: where it lies from the second.
_RELATION_READING = {
    "left": "left", "right": "right", "above": "above", "top": "above",
    "below": "below", "under": "below", "bottom": "below",
}  # fmt: skip


def stated_relation(text: str) -> str | None:
    """Where the caption puts its first noun phrase relative to its second: "left", "right",
    "above" or "below" (the first relation word after the first shape word: "a red circle to the
    left of ...", "... on the right and ... on the left", "... at the top and ..."), or None."""
    tokens = tokenize(text)
    first_shape = next((i for i, t in enumerate(tokens) if t in SHAPE_WORDS), None)
    if first_shape is None:
        return None
    for tok in tokens[first_shape + 1 :]:
        if tok in _RELATION_READING:
            return _RELATION_READING[tok]
        if tok in SHAPE_WORDS:  # the second phrase ended with no relation word before it
            return None
    return None


def _attrs(obj: ShapeObject | Mapping[str, Any]) -> tuple[str, str, str]:
    if isinstance(obj, Mapping):
        return (obj["size"], obj["color"], obj["shape"])
    return (obj.size, obj.color, obj.shape)


def score_caption(
    text: str, objects: Iterable[ShapeObject | Mapping[str, Any]]
) -> tuple[int, bool]:
    """(how many of the scene's objects the caption states with the right size, colour and shape;
    whether it states every object and nothing else). `objects` may be ShapeObjects or the dicts
    of objects.json."""
    scene = Counter(_attrs(o) for o in objects)
    said: Counter[tuple[str | None, str | None, str]] = Counter()
    for m in parse_caption(text):
        said[(m.size, m.color, m.shape)] += m.count
    correct = sum((scene & said).values())
    return correct, correct == sum(scene.values()) == sum(said.values())


# -- questions -----------------------------------------------------------------------------------


def _describe(
    obj: ShapeObject, objects: Sequence[ShapeObject], fields: Iterable[tuple[str, ...]]
) -> tuple[str, ...] | None:
    """The first field combination that singles `obj` out, e.g. ("color", "shape"), or None."""
    for combo in fields:
        if sum(all(getattr(o, f) == getattr(obj, f) for f in combo) for o in objects) == 1:
            return combo
    return None


def _words(obj: ShapeObject, combo: tuple[str, ...]) -> str:
    return " ".join(getattr(obj, f) for f in ("size", "color", "shape") if f in combo)


# The generator's one wording of each question form ({...}: words of the scene). With COUNTED_ALL and
# RELATION_PHRASES they hold every non-scene word a question uses (QUESTION_WORDS);
# captioner.data.paraphrase parses questions by these templates and rewords them.
QUESTION_TEMPLATES: dict[str, str] = {
    "color": "what color is the {target}?",  # target: [size] shape
    "shape": "what shape is the {attributes} object?",  # attributes: colour, size, or size colour
    "count": "how many {counted} are there?",  # counted: [colour] objects, or [colour] plural
    "exist": "is there a {target}?",  # target: [size] [colour] shape
    "relation": "is the {a} {relation} the {b}?",  # a, b: [size or colour] shape
    "relation_what": "what {attribute} is the object {relation} the {b}?",  # attribute: shape|color
}
COUNTED_ALL = "objects"
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of", "right": "to the right of", "above": "above", "below": "below",
}  # fmt: skip


def _template_words() -> set[str]:
    texts = [re.sub(r"\{\w+\}", " ", t) for t in QUESTION_TEMPLATES.values()]
    return {w for text in [*texts, COUNTED_ALL, *RELATION_PHRASES.values()] for w in tokenize(text)}


SCENE_WORDS: frozenset[str] = frozenset([*SIZES, *COLOURS, *SHAPES, *_PLURAL.values()])
# Every word (and "?") of every question the generator writes: the training questions' vocabulary.
QUESTION_WORDS: frozenset[str] = frozenset(_template_words() | SCENE_WORDS)


def make_questions(objects: Sequence[ShapeObject], rng: random.Random, size: int) -> list[Question]:
    """6 to 10 questions with unambiguous answers (fewer only when a scene of look-alike objects
    allows no more): colour, shape, count, existence (one yes, one no) and, where clear, relation."""
    objs = list(objects)
    asked: dict[str, Question] = {}  # by text: no question twice

    def ask(q: Question) -> None:
        asked.setdefault(q.question, q)

    with_shape = [("shape",), ("size", "shape"), ("color", "shape"), ("size", "color", "shape")]
    for obj in rng.sample(objs, min(2, len(objs))):
        if combo := _describe(obj, objs, with_shape[:2]):
            q = QUESTION_TEMPLATES["color"].format(target=_words(obj, combo))
            ask(Question(q, obj.color, "color", "other"))
    for obj in rng.sample(objs, min(2, len(objs))):
        if combo := _describe(obj, objs, [("color",), ("size",), ("size", "color")]):
            q = QUESTION_TEMPLATES["shape"].format(attributes=_words(obj, combo))
            ask(Question(q, obj.shape, "shape", "other"))

    obj = rng.choice(objs)
    counted = [(COUNTED_ALL, lambda o: True)]
    counted += [(_PLURAL[sh], lambda o, sh=sh: o.shape == sh) for sh in rng.sample(SHAPES, 2)]
    for c in (obj.color, rng.choice(COLOURS)):
        counted.append((f"{c} {COUNTED_ALL}", lambda o, c=c: o.color == c))
    same_kind = obj.attrs[1:]
    counted.append((f"{obj.color} {_PLURAL[obj.shape]}", lambda o: o.attrs[1:] == same_kind))
    how_many = QUESTION_TEMPLATES["count"]
    counts = [
        Question(how_many.format(counted=what), str(sum(map(test, objs))), "count", "number")
        for what, test in counted
    ]
    rng.shuffle(counts)
    for _ in range(3 if len(objs) == 1 else 2):
        ask(counts.pop())

    obj = rng.choice(objs)
    exist = QUESTION_TEMPLATES["exist"]
    target = _words(obj, rng.choice(with_shape))
    ask(Question(exist.format(target=target), "yes", "exist", "yes/no"))
    choices = {"size": SIZES, "color": COLOURS, "shape": SHAPES}
    for _ in range(100):  # a near miss: a present object with one attribute changed
        field = rng.choice(tuple(choices))
        fake = replace(rng.choice(objs), **{field: rng.choice(choices[field])})
        combo = rng.choice([c for c in with_shape if field in c])
        if not any(all(getattr(o, f) == getattr(fake, f) for f in combo) for o in objs):
            ask(Question(exist.format(target=_words(fake, combo)), "no", "exist", "yes/no"))
            break
    for q in _relation_questions(objs, rng, size, with_shape[:3]):
        ask(q)
    while len(asked) < 6 and counts:
        ask(counts.pop())
    return list(asked.values())


def _relation_questions(
    objs: list[ShapeObject], rng: random.Random, size: int, fields: list[tuple[str, ...]]
) -> list[Question]:
    def name(obj: ShapeObject) -> str | None:
        combo = _describe(obj, objs, fields)
        return _words(obj, combo) if combo else None

    qs: list[Question] = []
    pairs = [(a, b, relation(a, b, size)) for a in objs for b in objs if a is not b]
    pairs = [(a, b, rel) for a, b, rel in pairs if rel and name(a) and name(b)]
    if pairs:  # "is the <a> <rel> the <b>?", asking the true relation half of the time
        a, b, rel = rng.choice(pairs)
        asked = rel if rng.random() < 0.5 else rng.choice([r for r in RELATION_PHRASES if r != rel])
        q = QUESTION_TEMPLATES["relation"].format(
            a=name(a), relation=RELATION_PHRASES[asked], b=name(b)
        )
        qs.append(Question(q, "yes" if asked == rel else "no", "relation", "yes/no"))
    # "what shape/color is the object <rel> the <b>?": one object there, the others clearly elsewhere
    singles = []
    for b in objs:
        others = [o for o in objs if o is not b]
        rels = [relation(o, b, size) for o in others]
        if name(b) and None not in rels:
            singles += [(o, b, r) for o, r in zip(others, rels) if rels.count(r) == 1]
    if singles:
        a, b, rel = rng.choice(singles)
        field = rng.choice(("shape", "color"))
        q = QUESTION_TEMPLATES["relation_what"].format(
            attribute=field, relation=RELATION_PHRASES[rel], b=name(b)
        )
        qs.append(Question(q, getattr(a, field), "relation", "other"))
    return qs
