"""Shapes-world questions in other words: each generated question reworded, its answer unchanged.

The generator (`captioner.data.shapes`) asks each form of question in one wording
(`QUESTION_TEMPLATES`); people ask in their own. `paraphrase(question, rng)` reads a generated
question back by those templates (`parse_question`) and writes it again from one of several
templates of its form, with synonyms drawn by `rng`. The scene's words (object names, colours and
sizes) and the relation's direction stay, so the same answer is right.

Words. `QUESTION_WORDS` (in `shapes`) is every word of every generated question, "?" included:
the training questions' whole vocabulary. A paraphrase keeps only `KEPT_WORDS` of it: the scene's
words (small, large; red, green, blue, yellow, purple, white; circle, square, triangle, diamond,
cross and their plurals), "left" and "right" (no other word says them), and "the", "a", "is",
"are", "there", "what", "how", "many", "of" and "?". The rest, `REPLACED_WORDS` ("color", "shape",
"object", "objects", "to", "above", "below"), never appears in a paraphrase, and every other word
a paraphrase uses is one that no generated question uses.

Substitutions (`{...}` is drawn from the list of that name):
- colour: "what color is the {target}?" -> "what {colour} is the {target}?", "which {colour} is
  the {target}?", "which {colour} does the {target} have?", "the {target} is which {colour}?",
  "in which {colour} is the {target} drawn?", "what is the {colour} of the {target}?";
  {colour}: colour, hue, shade.
- shape: "what shape is the {attributes} object?" -> "what {form} is the {attributes} {thing}?",
  "which {form} does the {attributes} {thing} have?", "what is the {form} of the {attributes}
  {thing}?", "the {attributes} {thing} has which {form}?", "what does the {attributes} {thing}
  look like?"; {form}: form, figure, outline; {thing}: item, thing, piece, one.
- count: "how many {counted} are there?" -> "how many {counted} can you see?", "how many
  {counted} are there in total?", "how many {counted} does the picture show?", "how many
  {counted} are visible?", "what is the number of {counted}?", "how many {counted} do you
  count?"; "objects" in {counted} -> {things}: shapes, items, things, pieces.
- exist: "is there a {target}?" -> "is there any {target}?", "do you see a {target}?", "can you
  find a {target}?", "does the picture contain a {target}?", "is a {target} visible?", "does the
  image show a {target}?".
- relation: "is the {a} {relation} the {b}?" -> "is the {a} {relation} the {b}?", "is the {a}
  placed {relation} the {b}?", "does the {a} sit {relation} the {b}?", "would you say the {a} is
  {relation} the {b}?".
- relation, what: "what {attribute} is the object {relation} the {b}?" -> "what {attribute} is
  the {thing} {relation} the {b}?", "which {attribute} does the {thing} {relation} the {b} have?",
  "the {thing} {relation} the {b} has which {attribute}?", "what is the {attribute} of the
  {thing} {relation} the {b}?"; {attribute}: {colour} for color, {form} for shape.
- {relation}: "to the left of" -> left of, on the left of, on the left side of, further left
  than; "to the right of" -> right of, on the right of, on the right side of, further right than;
  "above" -> higher than, over, higher up than, further up than; "below" -> lower than, under,
  beneath, underneath, further down than.

Training words. `vary(question, rng)` (`make_shapes --vary-train`) writes a training question in
other everyday words, so that a model meets each meaning in more than one word; none of them is a
word a paraphrase uses, so the paraphrased test split still asks in words no training question
uses. Templates (VARIED_TEMPLATES: three of its own per form, then the three of
REWORDING_TEMPLATES with "color", "shape" and "object" as slots; `{...}` drawn from
TRAINING_SYNONYMS, the generator's word among them):
- colour: "what {color} is the {target}?", "tell me the {color} of the {target}?", "name the
  {color} of the {target}?", "the {target} is what {color}?", "what is the {color} of the
  {target}?", "of what {color} is the {target}?"; {color}: color, tint, coloring, tone.
- shape: "what {shape} is the {attributes} {object}?", "tell me the {shape} of the {attributes}
  {object}?", "what kind of {shape} is the {attributes} {object}?", "the {attributes} {object}
  is what {shape}?", "what is the {shape} of the {attributes} {object}?", "of what {shape} is
  the {attributes} {object}?"; {shape}: shape, geometry, contour, silhouette; {object}: object,
  element, entity, symbol, drawing, graphic.
- count: "how many {counted} are there?", "tell me how many {counted} there are?", "what is the
  {amount} of {counted}?", "there are how many {counted}?", "of the {counted} how many are
  there?", "how many are there of the {counted}?"; "objects" -> objects, elements, entities,
  symbols, drawings, graphics; {amount}: amount, quantity, tally (no generator word: it asks
  for a count without "how many").
- exist: "is there a {target}?", "tell me if there is a {target}?", "is there a {target} or
  not?", "is a {target} there?", "there is a {target}?", "is there a {target} there?".
- relation: "is the {a} {relation} the {b}?", "tell me if the {a} is {relation} the {b}?", "tell
  me if the {b} is {inverse} the {a}?", "the {a} is {relation} the {b}?", "is the {b} {inverse}
  the {a}?", "the {b} is {inverse} the {a}?" ({inverse}: asked the other way round).
- relation, what: "what {attribute} is the {object} {relation} the {b}?", "tell me the
  {attribute} of the {object} {relation} the {b}?", "name the {attribute} of the {object}
  {relation} the {b}?", "the {object} {relation} the {b} is what {attribute}?", "what is the
  {attribute} of the {object} {relation} the {b}?", "what {attribute} is there {relation} the
  {b}?".
- {relation}: "to the left of" or west of, "to the right of" or east of, "above" or north of,
  "below" or south of.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from captioner.data.shapes import (
    COLOURS,
    COUNTED_ALL,
    QUESTION_TEMPLATES,
    QUESTION_WORDS,
    RELATION_PHRASES,
    SCENE_WORDS,
    SHAPE_WORDS,
    SHAPES,
    SIZES,
)

__all__ = [
    "KEPT_WORDS",
    "PARAPHRASE_TEMPLATES",
    "REPLACED_WORDS",
    "REWORDING_TEMPLATES",
    "SYNONYMS",
    "TRAINING_SYNONYMS",
    "VARIED_TEMPLATES",
    "paraphrase",
    "parse_question",
    "reword",
    "vary",
]

# The canonical words a paraphrase may keep; every other canonical word it must replace.
KEPT_WORDS: frozenset[str] = (
    SCENE_WORDS
    | {"left", "right"}
    | frozenset(("the", "a", "is", "are", "there", "what", "how", "many", "of", "?"))
)
REPLACED_WORDS: frozenset[str] = QUESTION_WORDS - KEPT_WORDS

SYNONYMS: dict[str, tuple[str, ...]] = {
    "colour": ("colour", "hue", "shade"),  # for "color"
    "form": ("form", "figure", "outline"),  # for "shape"
    "thing": ("item", "thing", "piece", "one"),  # for "object"
    "things": ("shapes", "items", "things", "pieces"),  # for "objects"
    "left": ("left of", "on the left of", "on the left side of", "further left than"),
    "right": ("right of", "on the right of", "on the right side of", "further right than"),
    "above": ("higher than", "over", "higher up than", "further up than"),
    "below": ("lower than", "under", "beneath", "underneath", "further down than"),
}
PARAPHRASE_TEMPLATES: dict[str, tuple[str, ...]] = {  # by the form's key in QUESTION_TEMPLATES
    "color": (
        "what {colour} is the {target}?",
        "which {colour} is the {target}?",
        "which {colour} does the {target} have?",
        "the {target} is which {colour}?",
        "in which {colour} is the {target} drawn?",
        "what is the {colour} of the {target}?",
    ),
    "shape": (
        "what {form} is the {attributes} {thing}?",
        "which {form} does the {attributes} {thing} have?",
        "what is the {form} of the {attributes} {thing}?",
        "the {attributes} {thing} has which {form}?",
        "what does the {attributes} {thing} look like?",
    ),
    "count": (
        "how many {counted} can you see?",
        "how many {counted} are there in total?",
        "how many {counted} does the picture show?",
        "how many {counted} are visible?",
        "what is the number of {counted}?",
        "how many {counted} do you count?",
    ),
    "exist": (
        "is there any {target}?",
        "do you see a {target}?",
        "can you find a {target}?",
        "does the picture contain a {target}?",
        "is a {target} visible?",
        "does the image show a {target}?",
    ),
    "relation": (
        "is the {a} {relation} the {b}?",
        "is the {a} placed {relation} the {b}?",
        "does the {a} sit {relation} the {b}?",
        "would you say the {a} is {relation} the {b}?",
    ),
    "relation_what": (
        "what {attribute} is the {thing} {relation} the {b}?",
        "which {attribute} does the {thing} {relation} the {b} have?",
        "the {thing} {relation} the {b} has which {attribute}?",
        "what is the {attribute} of the {thing} {relation} the {b}?",
    ),
}


# Other sentence structures in the generator's own words (QUESTION_WORDS only): what
# `make_shapes --reword-train` adds to a training split, so that a model learns that the same
# question comes in more than one word order, without ever seeing a word a paraphrase brings in.
REWORDING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "the {target} is what color?",
        "what is the color of the {target}?",
        "of what color is the {target}?",
    ),
    "shape": (
        "the {attributes} object is what shape?",
        "what is the shape of the {attributes} object?",
        "of what shape is the {attributes} object?",
    ),
    "count": (
        "there are how many {counted}?",
        "of the {counted} how many are there?",
        "how many are there of the {counted}?",
    ),
    "exist": (
        "is a {target} there?",
        "there is a {target}?",
        "is there a {target} there?",
    ),
    "relation": (
        "the {a} is {relation} the {b}?",
        "is the {b} {inverse} the {a}?",
        "the {b} is {inverse} the {a}?",
    ),
    "relation_what": (
        "the object {relation} the {b} is what {attribute}?",
        "what is the {attribute} of the object {relation} the {b}?",
        "what {attribute} is there {relation} the {b}?",
    ),
}
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}

# Everyday words of the training side: what `make_shapes --vary-train` adds to a training split, so
# that a model meets each meaning in more than one word and learns it as a region of the word
# vectors, not one point. Each list starts with the generator's word ("amount" has none). No word
# here (or in VARIED_TEMPLATES) is one a paraphrase uses, so the paraphrased test split still asks
# in words no training question uses.
TRAINING_SYNONYMS: dict[str, tuple[str, ...]] = {
    "color": ("color", "tint", "coloring", "tone"),
    "shape": ("shape", "geometry", "contour", "silhouette"),
    "object": ("object", "element", "entity", "symbol", "drawing", "graphic"),
    "objects": ("objects", "elements", "entities", "symbols", "drawings", "graphics"),
    "amount": ("amount", "quantity", "tally"),  # no generator word: a count without "how many"
    "left": ("to the left of", "west of"),
    "right": ("to the right of", "east of"),
    "above": ("above", "north of"),
    "below": ("below", "south of"),
}
_OWN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "what {color} is the {target}?",
        "tell me the {color} of the {target}?",
        "name the {color} of the {target}?",
    ),
    "shape": (
        "what {shape} is the {attributes} {object}?",
        "tell me the {shape} of the {attributes} {object}?",
        "what kind of {shape} is the {attributes} {object}?",
    ),
    "count": (
        "how many {counted} are there?",
        "tell me how many {counted} there are?",
        "what is the {amount} of {counted}?",
    ),
    "exist": (
        "is there a {target}?",
        "tell me if there is a {target}?",
        "is there a {target} or not?",
    ),
    "relation": (
        "is the {a} {relation} the {b}?",
        "tell me if the {a} is {relation} the {b}?",
        "tell me if the {b} is {inverse} the {a}?",
    ),
    "relation_what": (
        "what {attribute} is the {object} {relation} the {b}?",
        "tell me the {attribute} of the {object} {relation} the {b}?",
        "name the {attribute} of the {object} {relation} the {b}?",
    ),
}


def _with_slots(template: str) -> str:
    """A REWORDING_TEMPLATES template with its generator words made slots for TRAINING_SYNONYMS."""
    return re.sub(r"\b(color|shape|object)\b", r"{\1}", template)


# The training side's own structures, then the rewordings' with their words drawn as synonyms.
VARIED_TEMPLATES: dict[str, tuple[str, ...]] = {
    form: (*own, *map(_with_slots, REWORDING_TEMPLATES[form]))
    for form, own in _OWN_TEMPLATES.items()
}


def _any(words: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_SIZE, _COLOUR, _SHAPE = _any(SIZES), _any(COLOURS), _any(SHAPES)
_PLURAL = _any(w for w, shape in SHAPE_WORDS.items() if w != shape)
_OBJECT = f"(?:{_SIZE} )?(?:{_COLOUR} )?{_SHAPE}"
_FIELDS = {  # what each placeholder of QUESTION_TEMPLATES holds
    "target": _OBJECT,
    "a": _OBJECT,
    "b": _OBJECT,
    "attributes": f"(?:{_SIZE} {_COLOUR}|{_SIZE}|{_COLOUR})",
    "counted": f"(?:{_COLOUR} )?(?:{re.escape(COUNTED_ALL)}|{_PLURAL})",
    "relation": _any(RELATION_PHRASES.values()),
    "attribute": "(?:shape|color)",
}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, ..., literal
    return re.compile(
        "".join(
            f"(?P<{part}>{_FIELDS[part]})" if i % 2 else re.escape(part)
            for i, part in enumerate(parts)
        )
    )


_PATTERNS = {form: _pattern(template) for form, template in QUESTION_TEMPLATES.items()}
_DIRECTION = {phrase: direction for direction, phrase in RELATION_PHRASES.items()}


def parse_question(question: str) -> tuple[str, dict[str, str]]:
    """(form, fields) of a generated question: the key of its QUESTION_TEMPLATES entry and what
    each placeholder holds, e.g. ("color", {"target": "large circle"})."""
    found = [(form, m) for form, p in _PATTERNS.items() if (m := p.fullmatch(question))]
    if len(found) != 1:
        forms = "; ".join(QUESTION_TEMPLATES.values())
        raise ValueError(f"not a generated shapes-world question: {question!r}; forms: {forms}")
    form, match = found[0]
    return form, match.groupdict()


def _rewrite(
    form: str,
    fields: dict[str, str],
    rng: random.Random,
    templates: dict[str, tuple[str, ...]],
    words: dict[str, tuple[str, ...]],
    slots: dict[str, str],
    inverse: bool = False,
) -> str:
    """A question of `form` (`fields` from `parse_question`) written again, drawn by `rng`: a
    template of `templates[form]`, each generator word in the fields swapped for one of
    `words[that word]` ("color", "shape", "objects", a direction) and each slot of `slots`
    (slot name -> generator word) filled the same way; with `inverse`, also {inverse}, a word
    for the opposite direction, for a relation asked the other way round."""
    if "relation" in fields:
        direction = _DIRECTION[fields["relation"]]
        fields["relation"] = rng.choice(words[direction])
        if inverse:
            fields["inverse"] = rng.choice(words[_INVERSE[direction]])
    if "attribute" in fields:
        fields["attribute"] = rng.choice(words[fields["attribute"]])
    if "counted" in fields:
        counted = fields["counted"].split()
        if counted[-1] == COUNTED_ALL:
            counted[-1] = rng.choice(words[COUNTED_ALL])
        fields["counted"] = " ".join(counted)
    template = rng.choice(templates[form])
    fill = {slot: rng.choice(words[word]) for slot, word in slots.items()}
    return template.format(**fields, **fill)


# SYNONYMS by the generator word each list replaces, and PARAPHRASE_TEMPLATES' slots by theirs.
_PARAPHRASE_WORDS = {
    **{direction: SYNONYMS[direction] for direction in RELATION_PHRASES},
    "color": SYNONYMS["colour"],
    "shape": SYNONYMS["form"],
    "object": SYNONYMS["thing"],
    COUNTED_ALL: SYNONYMS["things"],
}
_PARAPHRASE_SLOTS = {"colour": "color", "form": "shape", "thing": "object"}


def paraphrase(question: str, rng: random.Random) -> str:
    """`question` (a generated shapes-world question) in other words, drawn by `rng` from
    PARAPHRASE_TEMPLATES and SYNONYMS: same form, same scene words, same answer."""
    form, fields = parse_question(question)
    return _rewrite(form, fields, rng, PARAPHRASE_TEMPLATES, _PARAPHRASE_WORDS, _PARAPHRASE_SLOTS)


def reword(question: str, rng: random.Random) -> str:
    """`question` (a generated shapes-world question) in another word order drawn by `rng` from
    REWORDING_TEMPLATES, in the generator's own words: same form, same answer. A relation may be
    asked the other way round ("is the b below the a?" for "is the a above the b?"): the
    generator asks only clear-cut relations, and those hold exactly when their inverse does."""
    form, fields = parse_question(question)
    if "relation" in fields:
        direction = _DIRECTION[fields["relation"]]
        fields["inverse"] = RELATION_PHRASES[_INVERSE[direction]]
    return rng.choice(REWORDING_TEMPLATES[form]).format(**fields)


def vary(question: str, rng: random.Random) -> str:
    """`question` (a generated shapes-world question) in other words drawn by `rng`: a template of
    VARIED_TEMPLATES, each replaceable word from TRAINING_SYNONYMS (its own word among them). Same
    form, same answer, never a word a paraphrase uses, and never `question` itself (drawn again
    until it differs). A relation may be asked the other way round, as in `reword`."""
    form, fields = parse_question(question)
    slots = {word: word for word in ("color", "shape", "object", "amount")}
    while True:
        varied = _rewrite(
            form, dict(fields), rng, VARIED_TEMPLATES, TRAINING_SYNONYMS, slots, inverse=True
        )
        if varied != question:
            return varied
