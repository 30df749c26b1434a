"""Schema fuzzing helpers shared by bench/fuzz_api.py (the long fuzz) and
tests/test_api_schema_fuzz.py (a short one in every test run).

The OpenAPI document is read from an app without models (it does not depend on them) through
schemathesis's ASGI loader; requests are sent to an app with real models (`case.call(app=...)`),
whose lifespan schemathesis runs. In the fuzzing phase, the generated file parts of bodies that
fit the schema are mostly swapped for real images (`before_generate_body`), and `expected_status`
gives the exact status of any request that fits the schema, so the success paths are checked as
well as the error paths.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.generation.value import GeneratedValue
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from api.app import create_app
from api.settings import Settings
from captioner.image import ImageError, ImageTooLargeError, load_image
from captioner.vocab import tokenize

KEY = "fuzz-key"
# Small caps, so that real images hit the byte, pixel and image-count limits too.
LIMITS: dict[str, int] = dict(
    max_upload_bytes=6_000, max_pixels=40 * 40, max_batch_images=6, max_queue=16
)
MODES = {
    "PNG": ["RGB", "RGBA", "L", "P", "1", "I;16"],
    "JPEG": ["RGB", "L", "CMYK"],
    "GIF": ["P", "L"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["RGB", "L", "P", "1"],
    "TIFF": ["RGB", "RGBA", "L", "CMYK"],
}
# `positive_data_acceptance` expects a 2xx for any request that fits the schema, but the schema
# cannot say "a decodable image": `expected_status` replaces it with the exact status.
OPEN_EXCLUDED = [positive_data_acceptance, ignored_auth]  # no key configured: keys are ignored
KEYED_EXCLUDED = [positive_data_acceptance]
KEYED_HEADERS = {"X-API-Key": KEY}


def settings(**overrides: Any) -> Settings:
    """Settings of a fuzzed app: no models unless given, no batching delay."""
    values: dict[str, Any] = {
        "caption_model": None,
        "vqa_model": None,
        "max_batch_delay_ms": 0,
        "request_timeout_s": 20,
        "api_key": None,
        "cors_origins": [],
    }
    return Settings(**{**values, **overrides})


def noise_image(seed: int, size: tuple[int, int], mode: str) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def file_fields(document: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """`{"POST /caption": {"image": False}, ...}`: each multipart file field, True when repeated."""

    def is_file(schema: dict[str, Any]) -> bool:
        return schema.get("contentMediaType") == "application/octet-stream"

    components = document["components"]["schemas"]
    found: dict[str, dict[str, bool]] = {}
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            content = operation.get("requestBody", {}).get("content", {})
            ref = content.get("multipart/form-data", {}).get("schema", {}).get("$ref")
            if ref is None:
                continue
            properties = components[ref.rsplit("/", 1)[-1]]["properties"]
            found[f"{method.upper()} {path}"] = {
                name: prop.get("type") == "array"
                for name, prop in properties.items()
                if is_file(prop) or is_file(prop.get("items", {}))
            }
    return found


FILE_FIELDS = file_fields(create_app(settings()).openapi())


@st.composite
def real_images(draw: st.DrawFn) -> bytes:
    """An encoded image of a random format, mode and size (some over the caps in LIMITS)."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    buf = io.BytesIO()
    noise_image(draw(st.integers(0, 1000)), size, mode).save(buf, fmt)
    data = buf.getvalue()
    if draw(st.integers(0, 9)) == 0:  # now and then a real header with a truncated body
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


def _real_or(value: object) -> st.SearchStrategy:
    # The coverage phase sends the generated (non-image) contents often enough; here, mostly real.
    return st.one_of(real_images(), real_images(), st.just(value))


def before_generate_body(context, strategy):
    """Swap generated file contents for real images, mostly, in bodies that fit the schema.

    A negated body (schemathesis wraps it in `GeneratedValue`, with what it negated) is sent as
    generated: schemathesis judges it by the body as sent, and a real image there (bytes, not text)
    would hide that a negated field became valid on the wire. Any bytes fit a file field, so a
    body that fits the schema still does after the swap.
    """
    fields = FILE_FIELDS.get(context.operation.label)
    if not fields:
        return strategy
    return strategy.flatmap(lambda body: _with_real_images(fields, body))


def _with_real_images(fields: dict[str, bool], body: object) -> st.SearchStrategy:
    if isinstance(body, GeneratedValue) or not isinstance(body, dict):
        return st.just(body)
    swaps = {}
    for name, repeated in fields.items():
        value = body.get(name)
        if not repeated and isinstance(value, str):
            swaps[name] = _real_or(value)
        elif repeated and isinstance(value, list) and all(isinstance(v, str) for v in value):
            all_real = st.lists(real_images(), min_size=len(value), max_size=len(value))
            swaps[name] = st.one_of(all_real, st.tuples(*map(_real_or, value)).map(list))
    return st.fixed_dictionaries(swaps).map(lambda new: {**body, **new})


def load_schema(max_examples: int, **generation: Any):
    """The app's OpenAPI document as a schemathesis schema: derandomized, no example database."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings()))
    schema.config.generation.update(
        max_examples=max_examples, deterministic=True, database="none", **generation
    )
    # A request too large to take is rejected with 413 (the DESIGN's status for it), whatever else
    # is wrong with it: e.g. a negated batch whose `null` items are sent as that many files.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    schema.hook(before_generate_body)
    return schema


def fuzz_settings(model_dirs: dict[str, Any], **overrides: Any):
    return settings(**model_dirs, **LIMITS, **overrides)


def _upload_status(value: object) -> int:
    """What one upload should get: 413 over a cap, 415 if it does not decode, else 200."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(data) > LIMITS["max_upload_bytes"]:
        return 413
    try:
        load_image(data, LIMITS["max_pixels"])
    except ImageTooLargeError:
        return 413
    except ImageError:
        return 415
    return 200


def expected_status(case) -> int | None:
    """The exact status of a request that fits the schema; None for one that does not."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if case.method.upper() != case.operation.method.upper():
        return None
    if case.operation.path == "/models/{name}/card":
        return None  # 200 for a loaded model's name, else 404: the document cannot list them
    fields = FILE_FIELDS.get(case.operation.label)
    if fields is None:
        return 200  # a valid query is served: the models are loaded
    body = case.body
    question = body.get("question")
    if isinstance(question, str) and not tokenize(question):
        return 422  # only whitespace; the form is validated before any upload is read
    for name, repeated in fields.items():
        uploads = body[name] if repeated else [body[name]]
        if repeated and len(uploads) > LIMITS["max_batch_images"]:
            return 413
        for value in uploads:  # read in order: the first bad one answers
            status = _upload_status(value)
            if status != 200:
                return status
    return 200


def problems(case, response) -> list[str]:
    """What is wrong with a response beyond schemathesis's checks: a 5xx, a status other than the
    exact expected one, an error body without a string `detail`."""
    found = []
    if response.status_code >= 500:
        found.append(f"server error {response.status_code}: {response.text[:200]}")
    expected = expected_status(case)
    if expected is not None and response.status_code != expected:
        found.append(f"expected {expected}, got {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        detail = body.get("detail") if isinstance(body, dict) else None
        if not (isinstance(detail, str) and detail):
            found.append(f"error body without a string detail: {response.text[:200]}")
    return found


def save_untrained_models(folder: Path) -> dict[str, Path]:
    """A tiny random captioner and VQA model in `folder` (the app's caption_model / vqa_model):
    their answers mean nothing, but every route runs end to end."""
    import torch

    from captioner import Answerer, Captioner
    from captioner.caption.caption_net import CaptionNet
    from captioner.encoder import EncoderConfig
    from captioner.vocab import Vocabulary
    from captioner.vqa.vqa_net import VQANet

    torch.manual_seed(0)
    encoder = EncoderConfig(name="small_cnn", input_size=32, grid_size=4, width=4)
    words = Vocabulary.build(["a small red circle to the left of a large blue square"])
    net = CaptionNet.build(encoder, len(words), embed_dim=16, hidden_dim=24, attention_dim=12)
    caption_model = Captioner(net, words, name="untrained-cap").save(folder / "cap")
    questions = Vocabulary.build(["what color is the circle?", "how many shapes are there?"])
    answers = ["red", "blue", "one", "two", "yes", "no"]
    vqa = VQANet.build(encoder, len(questions), len(answers), embed_dim=8, hidden_dim=8)
    vqa_model = Answerer(vqa, questions, answers, name="untrained-vqa").save(folder / "vqa")
    return {"caption_model": caption_model, "vqa_model": vqa_model}
