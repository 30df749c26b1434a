"""The web page (`GET /`) in a real headless Chromium, and the sample-scene routes behind it.

The real app runs under uvicorn on 127.0.0.1 (a free port) with tiny models written to tmp_path and
an API key configured; Debian's `chromium` is driven by Playwright. Without that browser or the
`playwright` package the browser tests skip with the reason (`make test` installs both).
Screenshots go to `test-artifacts/`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from api.app import create_app
from api.settings import Settings
from captioner.caption.captioner import Captioner
from captioner.caption.decoder import CaptionDecoder
from captioner.data.shapes import make_scene, render
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL
from captioner.vocab import Vocabulary
from tests.api_fixtures import COCO_MINI
from tests.conftest import TINY_CAPTIONS, scripted_model, tiny_encoder_config, tiny_model

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "web-page-test-key"
KEY_STORAGE = "captioner.apiKey"  # app.js
HEAT_SIDE = 384  # app.js: longer side of the heatmap canvas
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a square?"]
ANSWERS = ["red", "blue", "green", "one", "two", "yes", "no"]
TIMEOUT_MS = 10_000


# -- the server -------------------------------------------------------------------------------------


def save_captioner(path: Path, attention: bool = True, seed: int = 0) -> Path:
    vocab = Vocabulary.build(TINY_CAPTIONS)
    model = tiny_model(len(vocab), seed=seed, attention=attention)
    training = {"data": {"dataset": "tiny"}}
    captioner = Captioner(model, vocab, name="tiny-cap", version="1", training=training)
    captioner.card = replace(
        captioner.card,
        summary="Captions tiny noise scenes; not meant for real photos.",
        domain="Random noise, 32x32.",
        limitations=("Knows nothing.", "Never ends a caption."),
        tests=(
            {
                "data": "4 noise images",
                "command": "python -m training.evaluate --model x",
                "metrics": {"CIDEr": 0.125, "per_type": {"color": 0.5}},
            },
        ),
    )
    return captioner.save(path)


def save_vqa(path: Path) -> tuple[Path | None, str]:
    """A tiny VQA model folder, or (None, why not) while the VQA side is unavailable."""
    try:
        from captioner.vqa.answerer import Answerer, VQANet

        torch.manual_seed(0)
        vocab = Vocabulary.build(QUESTIONS)
        net = VQANet.build(
            tiny_encoder_config(),
            len(vocab),
            len(ANSWERS),
            embed_dim=8,
            hidden_dim=8,
            attention_dim=8,
            fusion_dim=16,
            dropout=0.0,
        )
        model = Answerer(net, vocab, ANSWERS, name="tiny-vqa", version="1")
        return model.save(path, training={"data": {"dataset": "tiny"}}), ""
    except (ImportError, TypeError, ValueError) as exc:
        return None, f"no tiny VQA model could be built with captioner.vqa.answerer: {exc}"


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The real app under uvicorn in a thread, on a socket bound to a free loopback port."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", ws="none", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@dataclass
class Server:
    url: str
    vqa_skip_reason: str

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web")
    vqa_model, reason = save_vqa(root / "vqa")
    settings = Settings(
        caption_model=save_captioner(root / "captioner"),
        vqa_model=vqa_model,
        api_key=API_KEY,
        max_batch_delay_ms=0,
        request_timeout_s=20,
        cors_origins=[],
    )
    with serving(settings) as url:
        yield Server(url, reason)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "scene.png"
    render(make_scene(7)).save(path)
    return path


@pytest.fixture(scope="module")
def portrait_png(tmp_path_factory) -> Path:
    """A tall photo: at 1280x900 its frame (70% of the window's height) reaches below the fold."""
    path = tmp_path_factory.mktemp("images") / "portrait.png"
    render(make_scene(7, size=96)).resize((400, 1000)).save(path)
    return path


# -- the browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` (make browser)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the `playwright` package is not installed (it is in the test extras)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page_factory(browser, server):
    """`open_page(with_key=True, width=1280, height=900)`: a fresh tab on the page."""
    contexts = []

    def open_page(with_key: bool = True, width: int = 1280, height: int = 900):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        if with_key:
            context.add_init_script(f"sessionStorage.setItem({KEY_STORAGE!r}, {API_KEY!r})")
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.js_errors = errors
        console: list[str] = []
        page.on("console", lambda m: m.type == "error" and console.append(f"{m.text} {m.location}"))
        page.console_errors = console
        responses: list[str] = []
        page.on("response", lambda r: responses.append(r.url))
        page.responses = responses
        page.goto(server.url + "/")
        page.wait_for_selector("#status[data-state='ready']")
        return page

    yield open_page
    for context in contexts:
        context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


def visible(page, selector: str) -> bool:
    return page.locator(selector).is_visible()


def broken_images(page) -> list[str]:
    """The visible <img> elements that finished loading without a picture (a broken-image box)."""
    return page.evaluate(
        "() => Array.from(document.images).filter((img) => img.checkVisibility()"
        " && img.complete && img.naturalWidth === 0).map((img) => img.id || img.src)"
    )


def settle(page, x: float, y: float) -> None:
    """Wait until any scroll has stopped and the browser's hover state has caught up with the
    element now under the (still) pointer at (x, y): Chromium moves hover after a scroll ends."""
    page.evaluate(
        """() => new Promise((resolve) => {
          let last = scrollY, still = 0;
          const tick = () => {
            if (scrollY === last) still += 1; else { last = scrollY; still = 0; }
            if (still >= 5) resolve(); else requestAnimationFrame(tick);
          };
          requestAnimationFrame(tick);
        })"""
    )
    page.wait_for_function(
        "([x, y]) => { const el = document.elementFromPoint(x, y); return !el || el.matches(':hover'); }",
        arg=[x, y],
    )


def wait_for_caption(page) -> None:
    """Wait for the whole caption: its words stream in first, then the result replaces them."""
    page.wait_for_selector("#caption-panel[aria-busy='false'] #caption[aria-busy='false'] .word")


def word_under(page, x: float, y: float) -> str | None:
    return page.evaluate(
        "([x, y]) => { const el = document.elementFromPoint(x, y);"
        " return el && el.matches('#caption .word') ? el.dataset.index : null; }",
        [x, y],
    )


# -- the heatmap, computed as app.js should draw it ------------------------------------------------

_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
VIRIDIS = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, 5), _ANCHORS[:, c]) for c in range(3)], 1
).round()


def expected_pixel(attention: np.ndarray, size: tuple[int, int], x: int, y: int) -> np.ndarray:
    """Bilinear (pixel centres) upsampling to `size`, divided by the peak, coloured with viridis."""
    h, w = attention.shape
    width, height = size
    u = min(w - 1, max(0.0, (x + 0.5) * w / width - 0.5))
    v = min(h - 1, max(0.0, (y + 0.5) * h / height - 0.5))
    x0, y0 = int(u), int(v)
    x1, y1 = min(w - 1, x0 + 1), min(h - 1, y0 + 1)
    fx, fy = u - x0, v - y0
    top = attention[y0, x0] + (attention[y0, x1] - attention[y0, x0]) * fx
    bottom = attention[y1, x0] + (attention[y1, x1] - attention[y1, x0]) * fx
    value = (top + (bottom - top) * fy) / attention.max()
    return VIRIDIS[int(round(value * 255))]


def canvas_pixel(page, x: int, y: int) -> np.ndarray:
    rgba = page.evaluate(
        "([x, y]) => Array.from(document.getElementById('heat')"
        ".getContext('2d').getImageData(x, y, 1, 1).data)",
        [x, y],
    )
    return np.array(rgba, dtype=np.float64)


def assert_heatmap_shows(page, attention: np.ndarray) -> None:
    """Every grid cell's centre on the canvas has the colour that cell's weight should get."""
    width, height = page.evaluate(
        "() => [document.getElementById('heat').width, document.getElementById('heat').height]"
    )
    assert max(width, height) == HEAT_SIDE
    h, w = attention.shape
    for row in range(h):
        for col in range(w):
            x, y = int((col + 0.5) * width / w), int((row + 0.5) * height / h)
            rgba = canvas_pixel(page, x, y)
            assert abs(rgba[3] - 128) <= 1, rgba  # 50% over the image, as attention=png
            expected = expected_pixel(attention, (width, height), x, y)
            assert np.abs(rgba[:3] - expected).max() <= 4, (row, col, rgba, expected)


# -- the sample-scene routes (no browser) -----------------------------------------------------------


def test_sample_scene_is_the_generated_scene_and_needs_no_key(server):
    scene = make_scene(42, size=96)
    info = httpx.get(f"{server.url}/samples/scene", params={"seed": 42, "size": 96})
    assert info.status_code == 200, info.text
    body = info.json()
    assert body["captions"] == list(scene.captions)
    assert [q["question"] for q in body["questions"]] == [q.question for q in scene.questions]
    assert [q["answer"] for q in body["questions"]] == [q.answer for q in scene.questions]

    image = httpx.get(server.url + body["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(image.content)))
    assert np.array_equal(served, np.asarray(render(scene)))


@pytest.mark.parametrize(
    "params", [{"seed": -1}, {"seed": 2**31}, {"seed": "x"}, {"seed": 1, "size": 8}, {}]
)
def test_sample_scene_bad_parameters_get_422_with_detail(server, params):
    for path in ("/samples/scene", "/samples/scene.png"):
        response = httpx.get(server.url + path, params=params)
        assert response.status_code == 422, response.text
        assert set(response.json()) == {"detail"} and response.json()["detail"]


# -- the page in Chromium ---------------------------------------------------------------------------


def test_page_is_served_with_its_assets(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("static/app.js", "static/style.css"):
        assert f'"{asset}"' in page.text
        assert httpx.get(f"{server.url}/{asset}").status_code == 200


def test_a_visit_has_a_favicon_and_no_console_errors(page_factory, server, scene_png):
    page = page_factory()
    page.set_input_files("#file", str(scene_png))
    wait_for_caption(page)
    page.locator("#caption .word").first.hover()
    page.wait_for_selector("#heat[data-target='word:0']")
    # Chromium asks for the icon once the page has loaded; wait for its answer before judging.
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not any("favicon" in url for url in page.responses) and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert page.console_errors == []
    assert page.js_errors == []

    links = page.eval_on_selector_all("link[rel='icon']", "links => links.map((l) => l.href)")
    assert links and all(httpx.get(link).status_code == 200 for link in links), links
    icon = httpx.get(server.url + "/favicon.ico")  # asked for by browsers on pages without a link
    assert icon.status_code == 200
    assert icon.headers["content-type"] in ("image/x-icon", "image/vnd.microsoft.icon")
    assert Image.open(io.BytesIO(icon.content)).format == "ICO"


def test_upload_shows_caption_and_each_words_attention(page_factory, server, scene_png):
    page = page_factory()
    page.set_input_files("#file", str(scene_png))
    wait_for_caption(page)

    expected = httpx.post(
        f"{server.url}/caption",
        params={"beam_size": 3, "attention": "grid"},
        files={"image": ("scene.png", scene_png.read_bytes(), "image/png")},
        headers=server.headers(),
    ).json()
    words = page.locator("#caption .word")
    assert words.all_inner_texts() == expected["tokens"]
    assert len(expected["tokens"]) >= 2, "the tiny model should write at least two words"
    assert "tiny-cap 1" in page.inner_text("#caption-meta")
    assert not visible(page, "#heat")

    maps = np.array(expected["attention"]["maps"])  # (T, h, w)
    for index in (0, len(expected["tokens"]) - 1):
        words.nth(index).hover()
        page.wait_for_selector(f"#heat[data-target='word:{index}']")
        assert visible(page, "#heat")
        assert expected["tokens"][index] in page.inner_text("#heat-label")
        assert_heatmap_shows(page, maps[index])

    # Moving away hides a hovered map; a clicked (tapped) word keeps its map until clicked again.
    page.mouse.move(1, 1)
    page.wait_for_selector("#heat", state="hidden")
    words.nth(1).click()
    page.mouse.move(1, 1)
    assert page.get_attribute("#heat", "data-target") == "word:1"
    assert words.nth(1).get_attribute("aria-pressed") == "true"
    assert_heatmap_shows(page, maps[1])
    screenshot(page, "web-page-caption.png")
    words.nth(1).click()
    page.mouse.move(1, 1)
    page.wait_for_selector("#heat", state="hidden")
    assert page.js_errors == []


def test_pinned_word_keeps_its_map_when_the_page_scrolls_under_the_pointer(
    page_factory, portrait_png
):
    """A tall photo at 1280x900: the clicked word's map stays while the pointer stays where it was,
    whatever a scroll brings under it (Chromium sends mouseenter, not mousemove, after a scroll)."""
    page = page_factory(width=1280, height=900)
    page.set_input_files("#file", str(portrait_png))
    wait_for_caption(page)
    words = page.locator("#caption .word")
    token = words.first.inner_text()
    box = words.first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def assert_shows_the_pinned_word(when: str) -> None:
        shown = (page.get_attribute("#heat", "data-target"), page.inner_text("#heat-label"))
        moved = page.evaluate("() => scrollY")
        assert shown[0] == "word:0" and f"“{token}”" in shown[1], (when, shown, moved)
        assert words.first.get_attribute("aria-pressed") == "true"

    words.first.click()  # the pointer stays on the word's centre from here on
    settle(page, x, y)
    assert_shows_the_pinned_word("after the click")
    # The image was in view beside the caption: nothing to reveal, so the page did not move.
    assert page.evaluate("() => scrollY") == 0

    # Scroll by a line: another word comes under the still pointer; the pinned map stays.
    page.evaluate("(dy) => window.scrollBy(0, dy)", box["height"])
    under = word_under(page, x, y)
    assert under not in (None, "0"), "the scroll should bring another word under the pointer"
    settle(page, x, y)
    assert_shows_the_pinned_word("after a scroll")

    # Moving the pointer still previews the word under it; leaving shows the pinned word again.
    page.mouse.move(x + 1, y)
    page.wait_for_selector(f"#heat[data-target='word:{under}']")
    page.mouse.move(1, 1)
    page.wait_for_selector("#heat[data-target='word:0']")
    screenshot(page, "web-page-portrait.png")
    assert page.js_errors == []


def test_question_is_answered_with_confidence_and_attention(page_factory, server, scene_png):
    if server.vqa_skip_reason:
        pytest.skip(server.vqa_skip_reason)
    page = page_factory()
    page.set_input_files("#file", str(scene_png))
    wait_for_caption(page)
    question = "what color is the circle?"
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_selector("#answer:not([hidden])")

    expected = httpx.post(
        f"{server.url}/vqa",
        params={"top_k": 5, "attention": "grid"},
        files={"image": ("scene.png", scene_png.read_bytes(), "image/png")},
        data={"question": question},
        headers=server.headers(),
    ).json()
    assert page.inner_text("#answer-text") == expected["answer"]
    assert f"{expected['confidence'] * 100:.0f}" in page.inner_text("#confidence")
    rows = page.locator("#top-answers li .top-name").all_inner_texts()
    assert rows == [a["answer"] for a in expected["top_answers"]]
    # The answer's attention map is shown at once, over the same image.
    page.wait_for_selector("#heat[data-target='answer:0']")
    assert expected["answer"] in page.inner_text("#heat-label")
    assert_heatmap_shows(page, np.array(expected["attention"]["maps"][0]))
    screenshot(page, "web-page-answer.png")
    assert page.js_errors == []


def test_missing_api_key_is_explained_and_pasting_it_retries(page_factory, scene_png):
    page = page_factory(with_key=False)
    assert not page.locator("#key-panel").evaluate("el => el.open")
    page.set_input_files("#file", str(scene_png))
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "API key" in message and "missing API key" in message  # the API's own detail
    assert page.locator("#key-panel").evaluate("el => el.open")
    assert page.evaluate("() => document.activeElement.id") == "api-key"

    assert "API key" in page.inner_text("#models-note")  # the cards need the key too
    assert page.locator("#models .model").count() == 0

    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    wait_for_caption(page)  # the caption request was sent again, with the key
    page.wait_for_selector("#models .model")  # and the model cards were loaded
    assert not visible(page, "#error")
    assert page.evaluate(f"() => sessionStorage.getItem({KEY_STORAGE!r})") == API_KEY
    page.reload()
    page.wait_for_selector("#status[data-state='ready']")
    assert page.input_value("#api-key") == API_KEY
    assert "set" in page.inner_text("#key-badge")

    page.click("#key-panel summary")
    page.click("#key-forget")
    assert page.inner_text("#key-badge") == ""
    assert page.evaluate(f"() => sessionStorage.getItem({KEY_STORAGE!r})") is None


def test_api_error_detail_is_shown(page_factory, server, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    detail = httpx.post(
        f"{server.url}/caption",
        files={"image": ("notes.png", text_file.read_bytes(), "image/png")},
        headers=server.headers(),
    ).json()["detail"]

    page = page_factory()
    page.set_input_files("#file", str(text_file))
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert page.get_attribute("#error", "data-status") == "415"
    assert "not an image the service can read" in message and detail in message
    assert page.js_errors == []


def test_rejected_upload_leaves_no_broken_image(page_factory, tmp_path, scene_png):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image")
    page = page_factory()
    page.set_input_files("#file", str(text_file))
    page.wait_for_selector("#error:not([hidden])")
    page.wait_for_function("() => document.getElementById('photo').complete")
    screenshot(page, "web-page-rejected-upload.png")
    assert broken_images(page) == []

    # The next good image is shown as usual.
    page.set_input_files("#file", str(scene_png))
    wait_for_caption(page)
    page.wait_for_function("() => document.getElementById('photo').naturalWidth > 0")
    assert visible(page, "#photo") and broken_images(page) == []
    assert not visible(page, "#error")


def test_phone_width_sample_scene(page_factory, server):
    page = page_factory(width=390, height=844)
    page.click("#sample")
    wait_for_caption(page)
    alt = page.get_attribute("#photo", "alt")
    reference = page.inner_text("#reference")
    assert alt.startswith("Sample scene: ") and alt.removeprefix("Sample scene: ") in reference
    chips = page.locator("#suggestions .chip").all_inner_texts()
    assert chips and all(c.endswith("?") for c in chips)

    # Nothing is wider than the phone's screen, and the image fits it.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    box = page.locator("#photo").bounding_box()
    assert box is not None and 200 <= box["width"] <= 390
    # Tapping a word far below the image scrolls the image (with the word's map) back into view.
    last = page.locator("#caption .word").last
    last.scroll_into_view_if_needed()
    page.evaluate("() => window.scrollTo(0, document.getElementById('caption').offsetTop)")
    last.click()
    page.wait_for_selector("#heat:not([hidden])")
    page.wait_for_function(
        "() => { const b = document.getElementById('frame').getBoundingClientRect();"
        " return b.top >= 0 && b.bottom <= window.innerHeight; }"
    )
    if not server.vqa_skip_reason:
        page.locator("#suggestions .chip").first.click()
        page.wait_for_selector("#answer:not([hidden])")
    screenshot(page, "web-page-phone.png")
    assert page.js_errors == []


def test_without_attention_or_vqa_the_page_says_so(browser, tmp_path, scene_png):
    captioner = save_captioner(tmp_path / "cap", attention=False, seed=3)  # seed 3 writes words
    settings = Settings(caption_model=captioner, vqa_model=None, api_key=None)
    with serving(settings) as url:
        page = browser.new_page()
        try:
            page.goto(url + "/")
            page.wait_for_selector("#status[data-state='ready']")
            assert "vqa disabled" in page.inner_text("#status")
            assert page.is_disabled("#ask") and page.is_disabled("#question")
            assert "VQA model is disabled" in page.inner_text("#vqa-note")
            assert not visible(page, "#suggestions")

            page.set_input_files("#file", str(scene_png))
            wait_for_caption(page)
            assert page.locator("#caption button.word").count() == 0  # nothing to show per word
            assert "no attention maps" in page.inner_text("#caption-meta")
            page.locator("#caption .word").first.hover()
            assert not visible(page, "#heat")
        finally:
            page.close()


def test_an_unfamiliar_photo_gets_a_notice_naming_what_the_models_know(
    browser, tmp_path, scene_png
):
    """The demo models (with their domain statistics): a real photo gets a notice per model that
    names its training images, a shapes scene none."""
    photos = sorted((COCO_MINI / "images").glob("*.jpg"))
    if not photos:
        pytest.skip(f"coco-mini photos not found at {COCO_MINI / 'images'}")
    settings = Settings(
        caption_model=DEFAULT_CAPTION_MODEL, vqa_model=DEFAULT_VQA_MODEL, api_key=API_KEY
    )
    with serving(settings) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_init_script(f"sessionStorage.setItem({KEY_STORAGE!r}, {API_KEY!r})")
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(url + "/")
            page.wait_for_selector("#status[data-state='ready']")

            def upload_and_ask(path: Path) -> None:
                page.set_input_files("#file", str(path))
                page.wait_for_selector("#caption-panel[aria-busy='false'] #caption:not([hidden])")
                page.fill("#question", "what color is the circle?")
                page.click("#ask")
                page.wait_for_selector("#ask-panel[aria-busy='false'] #answer:not([hidden])")
                # both responses about this image have been checked
                page.wait_for_selector(
                    "#domain-notice[data-checked='caption vqa']", state="attached"
                )

            upload_and_ask(scene_png)
            assert not visible(page, "#domain-notice")

            upload_and_ask(photos[0])
            # One paragraph: the two models were trained on the same images.
            page.wait_for_selector("#domain-notice p[data-models='shapes-captioner shapes-vqa']")
            notice = page.locator("#domain-notice")
            assert notice.is_visible() and notice.locator("p").count() == 1
            text = notice.inner_text()
            assert text.startswith("This image is unlike what the model knows.")
            assert "shapes-captioner and shapes-vqa were trained only on synthetic shapes" in text
            assert "the caption and the answers may well be wrong" in text
            screenshot(page, "web-page-domain-notice.png")

            upload_and_ask(scene_png)  # back to a scene: the notice goes
            assert not visible(page, "#domain-notice")
            assert errors == []
        finally:
            context.close()


# -- the API docs in Chromium, offline --------------------------------------------------------------

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def offline_page(browser, server):
    """A tab that may reach only the test server: every request it sends is recorded
    (`page.requests`) and those to any other origin are refused, as on a machine without internet.
    (Requests that the browser itself refuses, as a Content-Security-Policy makes it, are not sent.)"""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    origin = server.url + "/"

    def send(route) -> None:
        requests.append(route.request.url)
        if route.request.url.startswith(origin):
            route.continue_()
        else:
            route.abort()

    context.route("**/*", send)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requests = requests
    yield page
    context.close()


def operations(server) -> set[tuple[str, str]]:
    """Every (method, path) that /openapi.json declares."""
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    return {
        (method, path) for path, item in paths.items() for method in item if method in HTTP_METHODS
    }


def outside(requests: list[str], server) -> list[str]:
    return [url for url in requests if not url.startswith(server.url + "/")]


def test_docs_link_opens_swagger_ui_with_every_operation_offline(offline_page, server):
    page = offline_page
    page.goto(server.url + "/")
    page.wait_for_selector("#status[data-state='ready']")
    page.click("a.docs")
    page.wait_for_url(server.url + "/docs")
    assert outside(page.requests, server) == []
    page.wait_for_selector(".swagger-ui .opblock")
    rendered = page.eval_on_selector_all(
        ".swagger-ui .opblock",
        "blocks => blocks.map((b) => [b.querySelector('.opblock-summary-method').textContent,"
        " b.querySelector('.opblock-summary-path').dataset.path])",
    )
    assert {(method.lower(), path) for method, path in rendered} == operations(server)
    assert page.locator(".swagger-ui .authorize").is_visible()  # the API key can be given here
    screenshot(page, "docs-swagger.png")
    assert f"{server.url}/static-offline-docs/swagger-ui-bundle.js" in page.requests
    assert outside(page.requests, server) == []


def test_redoc_renders_every_operation_offline(offline_page, server):
    page = offline_page
    page.goto(server.url + "/redoc")
    assert outside(page.requests, server) == []
    spec = httpx.get(server.url + "/openapi.json").json()
    ids = {
        op["operationId"]
        for item in spec["paths"].values()
        for m, op in item.items()
        if m in HTTP_METHODS
    }
    assert len(ids) == len(operations(server))
    page.wait_for_selector("[data-section-id^='operation/']")
    rendered = page.eval_on_selector_all(
        "[data-section-id^='operation/']",
        "sections => sections.map((s) => s.dataset.sectionId.slice('operation/'.length))",
    )
    assert set(rendered) == ids
    screenshot(page, "docs-redoc.png")
    assert f"{server.url}/static-offline-docs/redoc.standalone.js" in page.requests
    assert outside(page.requests, server) == []


def test_a_caption_cut_at_max_length_is_marked_unfinished(page_factory, server, scene_png):
    page = page_factory()
    page.set_input_files("#file", str(scene_png))
    wait_for_caption(page)
    expected = httpx.post(
        f"{server.url}/caption",
        params={"beam_size": 3},
        files={"image": ("scene.png", scene_png.read_bytes(), "image/png")},
        headers=server.headers(),
    ).json()
    assert expected["finished"] is False  # the untrained model never writes <end>
    n = len(expected["tokens"])
    assert page.inner_text("#caption .cut-mark") == "…"
    assert visible(page, "#caption-cut")
    assert f"cut at {n} words" in page.inner_text("#caption-cut")
    screenshot(page, "web-page-unfinished-caption.png")
    assert page.js_errors == []


def test_a_finished_caption_has_no_mark(browser, tmp_path, scene_png):
    vocab = Vocabulary.build(TINY_CAPTIONS)
    scripted = Captioner(scripted_model(vocab, ["two", "green", "triangles"]), vocab)
    settings = Settings(
        caption_model=scripted.save(tmp_path / "scripted"),
        vqa_model=None,
        max_batch_delay_ms=0,
        cors_origins=[],
    )
    with serving(settings) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/")
            page.wait_for_selector("#status[data-state='ready']")
            page.set_input_files("#file", str(scene_png))
            wait_for_caption(page)
            assert page.locator("#caption .word").all_inner_texts() == ["two", "green", "triangles"]
            assert page.locator("#caption .cut-mark").count() == 0
            assert not visible(page, "#caption-cut")
        finally:
            context.close()


# -- the caption streaming in (POST /caption/stream) ------------------------------------------------

SCRIPT = ["a", "small", "red", "circle", "to", "the", "left"]  # what the scripted captioner writes


class Steps:
    """The served captioner's decoder steps: while held, each waits for the test to allow it."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self._allowed = threading.Semaphore(0)

    def wrap(self, step):
        def gated(decoder, *args, **kwargs):
            if self.held.is_set() and not self._allowed.acquire(timeout=TIMEOUT_MS / 1000):
                raise RuntimeError("the test never allowed this decoder step")
            return step(decoder, *args, **kwargs)

        return gated

    def hold(self) -> None:
        self.held.set()

    def allow(self, n: int = 1) -> None:
        self._allowed.release(n)

    def free(self) -> None:
        self.held.clear()
        self._allowed.release(100)  # any step still waiting goes on


@dataclass
class SlowServer:
    url: str
    steps: Steps
    expected: dict  # POST /caption's body for scene_png, greedy


@contextmanager
def slow_server(tmp_path, monkeypatch, scene_png, **settings) -> Iterator[SlowServer]:
    """A scripted captioner whose decoder steps the test lets run one by one (`steps`)."""
    vocab = Vocabulary.build(TINY_CAPTIONS)
    scripted = Captioner(scripted_model(vocab, SCRIPT), vocab, name="scripted", version="1")
    steps = Steps()
    monkeypatch.setattr(CaptionDecoder, "step", steps.wrap(CaptionDecoder.step))
    settings = Settings(
        caption_model=scripted.save(tmp_path / "scripted"),
        vqa_model=None,
        max_batch_delay_ms=0,
        cors_origins=[],
        model_process=False,  # the decoder steps gated here are this process's
        **settings,
    )
    with serving(settings) as url:
        expected = httpx.post(
            f"{url}/caption",
            params={"beam_size": 1, "attention": "grid"},
            files={"image": ("scene.png", scene_png.read_bytes(), "image/png")},
        ).json()
        assert expected["tokens"] == SCRIPT and expected["attention"] is not None
        steps.hold()
        try:
            yield SlowServer(url, steps, expected)
        finally:
            steps.free()


def greedy_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    page.goto(url + "/")
    page.wait_for_selector("#status[data-state='ready']")
    page.select_option("#beam", "1")  # greedy search: each step fixes a word
    return context, page


def wait_for_words(page, n: int) -> list[str]:
    page.wait_for_function("(n) => document.querySelectorAll('#caption .word').length >= n", arg=n)
    return page.locator("#caption .word").all_inner_texts()


def stream_counts(url: str) -> dict[str, float]:
    """captioner_caption_streams_total by outcome, from GET /metrics."""
    counts = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("captioner_caption_streams_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('"')[1]] = float(value)
    return counts


def test_the_caption_streams_in_word_by_word(browser, tmp_path, monkeypatch, scene_png):
    with slow_server(tmp_path, monkeypatch, scene_png) as slow:
        context, page = greedy_page(browser, slow.url)
        try:
            expected = slow.expected
            maps = np.array(expected["attention"]["maps"])
            page.set_input_files("#file", str(scene_png))
            slow.steps.allow(1)
            assert wait_for_words(page, 1) == SCRIPT[:1]
            slow.steps.allow(2)
            assert wait_for_words(page, 3) == SCRIPT[:3]
            # A partial caption, still busy: no cut notice or model line until the result.
            assert page.get_attribute("#caption", "aria-busy") == "true"
            assert page.get_attribute("#caption-panel", "aria-busy") == "true"
            assert not visible(page, "#caption-cut") and page.inner_text("#caption-meta") == ""
            assert not visible(page, "#caption-empty")
            caret = "() => getComputedStyle(document.getElementById('caption'), '::after').content"
            assert "▍" in page.evaluate(caret)
            screenshot(page, "web-page-streaming.png")

            # The words so far show their maps already: hovered, and pinned with a click.
            words = page.locator("#caption .word")
            words.nth(2).hover()
            page.wait_for_selector("#heat[data-target='word:2']")
            assert f"“{SCRIPT[2]}”" in page.inner_text("#heat-label")
            assert_heatmap_shows(page, maps[2])
            words.nth(1).click()
            page.mouse.move(1, 1)
            assert page.get_attribute("#heat", "data-target") == "word:1"
            assert_heatmap_shows(page, maps[1])

            slow.steps.allow(len(SCRIPT) - 3 + 1)  # the other words, then <end>
            wait_for_caption(page)
            assert words.all_inner_texts() == expected["tokens"]
            assert page.locator("#caption .cut-mark").count() == 0
            assert "scripted 1, beam size 1" in page.inner_text("#caption-meta")
            assert page.evaluate(caret) in ("none", "normal")
            # The result's words keep the pin made on the streamed ones.
            assert page.get_attribute("#heat", "data-target") == "word:1"
            assert words.nth(1).get_attribute("aria-pressed") == "true"
            assert_heatmap_shows(page, maps[1])
            words.nth(len(SCRIPT) - 1).hover()  # and show their own maps
            page.wait_for_selector(f"#heat[data-target='word:{len(SCRIPT) - 1}']")
            assert_heatmap_shows(page, maps[-1])
            assert not visible(page, "#error") and page.js_errors == []
        finally:
            context.close()
        assert stream_counts(slow.url) == {"completed": 1.0}


def test_a_new_image_aborts_the_caption_streaming_in(
    browser, tmp_path, monkeypatch, scene_png, portrait_png
):
    with slow_server(tmp_path, monkeypatch, scene_png) as slow:
        context, page = greedy_page(browser, slow.url)
        try:
            page.set_input_files("#file", str(scene_png))
            slow.steps.allow(1)
            assert wait_for_words(page, 1) == SCRIPT[:1]

            page.set_input_files("#file", str(portrait_png))
            assert page.locator("#caption .word").count() == 0  # the old words are gone at once
            # The server sees the first request leave and stops its search. Its steps stay held
            # until then: freed earlier, it could finish before the browser's close arrives.
            deadline = time.monotonic() + TIMEOUT_MS / 1000
            while stream_counts(slow.url).get("disconnected") != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stream_counts(slow.url) == {"disconnected": 1.0}
            slow.steps.free()
            wait_for_caption(page)
            assert page.locator("#caption .word").all_inner_texts() == SCRIPT
            assert not visible(page, "#error") and page.js_errors == []
            assert stream_counts(slow.url) == {"completed": 1.0, "disconnected": 1.0}
        finally:
            context.close()


def test_an_error_event_after_the_first_words_is_shown(browser, tmp_path, monkeypatch, scene_png):
    with slow_server(tmp_path, monkeypatch, scene_png, request_timeout_s=2) as slow:
        context, page = greedy_page(browser, slow.url)
        try:
            page.set_input_files("#file", str(scene_png))
            slow.steps.allow(1)
            wait_for_words(page, 1)
            # No more steps: the request outlives its timeout, told by an `error` event.
            page.wait_for_selector("#error:not([hidden])")
            assert page.get_attribute("#error", "data-status") == "504"
            message = page.inner_text("#error")
            assert message == (
                "Captioning failed. The request took too long: "
                "the request took longer than its 2 s limit"
            )
            assert page.locator("#caption .word").count() == 0  # the words so far are dropped
            assert page.inner_text("#caption-empty") == "No caption."
            assert page.get_attribute("#caption-panel", "aria-busy") == "false"
            assert page.js_errors == []
        finally:
            context.close()


def test_event_stream_parser_takes_chunks_split_anywhere(page_factory, server, scene_png):
    """app.js's SSE parser gives the same events for a real stream however it is cut up, with
    "\n" or "\r\n" line ends: the words of POST /caption's result, then the result."""
    params = {"beam_size": 1, "max_length": 4, "attention": "grid"}
    upload = {"image": ("scene.png", scene_png.read_bytes(), "image/png")}
    text = httpx.post(
        f"{server.url}/caption/stream", params=params, files=upload, headers=server.headers()
    ).text
    expected = httpx.post(
        f"{server.url}/caption", params=params, files=upload, headers=server.headers()
    ).json()
    page = page_factory()
    splits = page.evaluate(
        """(text) => {
          const feed = (chunks) => { const parse = sseParser(); return chunks.flatMap(parse); };
          const outcomes = new Set();
          for (const t of [text, text.replaceAll("\\n", "\\r\\n")]) {
            for (let k = 0; k <= t.length; k++) {
              outcomes.add(JSON.stringify(feed([t.slice(0, k), t.slice(k)])));
            }
            outcomes.add(JSON.stringify(feed(Array.from(t))));
          }
          return Array.from(outcomes, JSON.parse);
        }""",
        text,
    )
    assert len(splits) == 1, "the events depend on where the stream was cut"
    [events] = splits
    n = len(expected["tokens"])
    assert [name for name, _ in events] == ["word"] * n + ["result"]
    words = [json.loads(data) for _, data in events[:n]]
    assert [w["token"] for w in words] == expected["tokens"]
    assert [w["attention"]["map"] for w in words] == expected["attention"]["maps"]
    assert json.loads(events[-1][1]) == expected


def test_unknown_question_words_are_shown(page_factory, server, scene_png):
    if server.vqa_skip_reason:
        pytest.skip(server.vqa_skip_reason)
    page = page_factory()
    page.set_input_files("#file", str(scene_png))
    wait_for_caption(page)
    page.fill("#question", "is the zebra above the refrigerator?")
    page.click("#ask")
    page.wait_for_selector("#unknown-words:not([hidden])")
    text = page.inner_text("#unknown-words")
    assert "“zebra”, “above”, “refrigerator”" in text and "does not know" in text
    assert visible(page, "#guess-note") and "guess" in page.inner_text("#guess-note")
    assert page.inner_text("#answer-text") in ANSWERS  # still answered
    screenshot(page, "web-page-unknown-words.png")

    page.fill("#question", "what color is the circle?")  # every word known
    page.click("#ask")
    page.wait_for_selector("#unknown-words", state="hidden")
    assert not visible(page, "#guess-note")

    page.fill("#question", "what color is the zebra?")  # one unknown word, a known content word
    page.click("#ask")
    page.wait_for_selector("#unknown-words:not([hidden])")
    assert "the word “zebra”" in page.inner_text("#unknown-words")
    assert not visible(page, "#guess-note")
    assert page.js_errors == []


def test_each_model_has_a_summary_line_and_its_whole_card(page_factory, server):
    page = page_factory()
    page.wait_for_selector("#models .model")
    models = httpx.get(f"{server.url}/models", headers=server.headers()).json()["models"]
    items = page.locator("#models .model")
    assert items.count() == len(models) == (1 if server.vqa_skip_reason else 2)
    for index, model in enumerate(models):
        item = items.nth(index)
        line = item.locator(".model-summary").inner_text()
        assert line.startswith(f"{model['name']} {model['version']} ({model['kind']}): ")
        assert line.endswith(model["card"]["summary"])
        assert not item.locator(".model-card dl").is_visible()  # the card is one click away
    captioner = items.nth(0)
    captioner.locator(".model-card summary").click()
    card = captioner.locator(".model-card dl").inner_text()
    for text in (
        "Random noise, 32x32.",
        "Knows nothing.",
        "Never ends a caption.",
        "Test: 4 noise images",
        "CIDEr 0.125; per_type: color 0.500",
        "python -m training.evaluate --model x",
        f"{models[0]['card']['vocabulary_size']} tokens",
    ):
        assert text in card, text
    screenshot(page, "web-page-model-card.png")
    assert page.js_errors == []
