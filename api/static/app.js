// The captioner web page: upload or generate an image, caption it (word by word, as the search
// fixes each word), show each word's attention map, ask questions. Plain JS, no build step; it
// talks to the same API as any other client.
"use strict";

const KEY_STORAGE = "captioner.apiKey";
const HEAT_SIDE = 384; // longer side of the heatmap canvas, in canvas pixels
const HEAT_ALPHA = 0.5; // as the server's attention=png overlays: 50% viridis over the image
const TOP_K = 5;
const DEFAULT_QUESTIONS = [
  "what color is the circle?",
  "how many objects are there?",
  "is there a square?",
];

// Viridis anchors at 0, 1/4, 1/2, 3/4, 1, as in captioner/overlay.py, interpolated into 256 colours.
const VIRIDIS = (() => {
  const anchors = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const table = [];
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (anchors.length - 1);
    const k = Math.min(anchors.length - 2, Math.floor(x));
    const f = x - k;
    table.push(anchors[k].map((a, c) => Math.round(a + (anchors[k + 1][c] - a) * f)));
  }
  return table;
})();

const $ = (id) => document.getElementById(id);
const els = {};
const state = {
  image: null, // the File or Blob being shown
  url: null, // its object URL
  generation: 0, // bumped on every new image, so late answers for an old one are dropped
  caption: null, // the last /caption result
  draft: null, // while a caption streams in: {tokens, maps} of its words so far
  captionRun: null, // the AbortController of the caption request under way
  vqa: null, // the last /vqa response
  pinned: null, // {kind: "word", index} or {kind: "answer", glimpse}; survives hover
  shown: null, // the target whose map is on show (pinned or hovered), or null
  retry: null, // what to run again once an API key is given
  vqaOff: false, // the server has no VQA model loaded
  domainCheck: {}, // per task ("caption", "vqa"): the last response for this image
  domains: null, // a promise of {model name: what it was trained on}, from GET /models
};

class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

// -- talking to the API -----------------------------------------------------------------------------

function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage can be blocked; the key then lasts until the page is left
  }
}

// fetch with the API key; a network failure becomes ApiError 0, an abort stays an AbortError.
async function send(path, options = {}) {
  const headers = {};
  const key = apiKey() || els.key.value.trim();
  if (key) headers["X-API-Key"] = key;
  try {
    return await fetch(path, {
      method: options.method || "GET",
      body: options.body,
      headers,
      signal: options.signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `could not reach the service (${err.message})`);
  }
}

function parseJson(text) {
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

// The ApiError for a non-2xx response: its JSON detail, else its status line.
function failure(response, text) {
  const data = parseJson(text);
  const detail =
    data && typeof data.detail === "string"
      ? data.detail
      : `${response.status} ${response.statusText || "error"}`;
  return new ApiError(response.status, detail, response.headers.get("Retry-After"));
}

async function api(path, options = {}) {
  const response = await send(path, options);
  const text = await response.text();
  if (!response.ok) throw failure(response, text);
  return parseJson(text);
}

// Server-sent events, parsed by hand (EventSource only sends GET): feed it decoded text as it
// arrives, in chunks that may split a line or an event anywhere; it returns the events the chunk
// completed, as [name, data]. Lines end in "\n" or "\r\n"; comments and other fields are skipped.
function sseParser() {
  let pending = ""; // an unfinished line
  let name = "";
  let data = [];
  return (chunk) => {
    const lines = (pending + chunk).split("\n");
    pending = lines.pop();
    const events = [];
    for (let line of lines) {
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        // a blank line ends the event
        if (data.length) events.push([name || "message", data.join("\n")]);
        name = "";
        data = [];
        continue;
      }
      const colon = line.indexOf(":");
      if (colon === 0) continue; // a comment
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    return events;
  };
}

// POST to a streaming route (POST /caption/stream): `onWord` gets each `word` event's data as it
// arrives; resolves with the `result` event's data. Errors before the stream are ApiErrors as
// api() throws them; an `error` event is an ApiError with its status and detail.
async function apiStream(path, options, onWord) {
  const response = await send(path, options);
  if (!response.ok) throw failure(response, await response.text());
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) {
    throw new ApiError(response.status, `expected server-sent events, got ${type || "no content type"}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parse = sseParser();
  let result = null;
  // Read to the end, not just to the result: a client that leaves early counts as one that left.
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `the connection was lost (${err.message})`);
    }
    // At the end an unfinished event is dropped, as EventSource drops it.
    const text = chunk.done ? decoder.decode() : decoder.decode(chunk.value, { stream: true });
    for (const [name, data] of parse(text)) {
      if (result) break; // nothing follows the result
      if (name === "word") onWord(JSON.parse(data));
      else if (name === "result") result = JSON.parse(data);
      else if (name === "error") {
        const error = JSON.parse(data);
        throw new ApiError(error.status, error.detail);
      }
    }
    if (chunk.done) break;
  }
  if (!result) throw new ApiError(0, "the stream ended before the caption was complete");
  return result;
}

const CONTEXT = {
  0: "The service cannot be reached",
  401: "An API key is needed",
  413: "The image is too large",
  415: "That file is not an image the service can read",
  422: "The request was refused",
  503: "The service is busy or the model is not loaded",
  504: "The request took too long",
};

function showError(err, what) {
  if (!(err instanceof ApiError)) {
    console.error(err);
    err = new ApiError(-1, String(err && err.message ? err.message : err));
  }
  const context = CONTEXT[err.status] || (err.status > 0 ? `Error ${err.status}` : "Error");
  let text = `${what} failed. ${context}: ${err.detail}`;
  if (err.retryAfter) text += ` (try again in ${err.retryAfter} s)`;
  els.error.textContent = text;
  els.error.dataset.status = String(err.status);
  els.error.hidden = false;
  if (err.status === 401) {
    els.keyPanel.open = true;
    els.keyState.textContent = "Paste the key and press “Use key”; the request is then sent again.";
    els.key.focus();
  }
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
  delete els.error.dataset.status;
}

function setBusy(panel, busy) {
  panel.setAttribute("aria-busy", busy ? "true" : "false");
  panel.classList.toggle("busy", busy);
}

// -- readiness ---------------------------------------------------------------------------------------

async function checkReady() {
  let ready;
  try {
    ready = await api("ready");
  } catch (err) {
    els.status.textContent = `Not ready: ${err.detail}`;
    els.status.dataset.state = "waiting";
    if (err.status === 0 || /loading/.test(err.detail)) setTimeout(checkReady, 2000);
    return;
  }
  const models = ready.models || {};
  const parts = Object.entries(models).map(([name, s]) => `${name} ${s}`);
  els.status.textContent = `Ready: ${parts.join(", ")}`;
  els.status.dataset.state = "ready";
  loadModels();
  if (models.vqa && models.vqa !== "loaded") {
    els.vqaNote.textContent = `Questions are not available: the VQA model is ${models.vqa} on this server.`;
    els.vqaNote.hidden = false;
    state.vqaOff = true;
    els.askButton.disabled = true;
    els.question.disabled = true;
    els.suggestions.hidden = true;
  }
}

// -- the models' cards -------------------------------------------------------------------------------

async function loadModels() {
  let data;
  try {
    data = await api("models");
  } catch (err) {
    els.modelsNote.textContent =
      err.status === 401
        ? "The model cards need the API key (see “API key” above)."
        : `The model cards are not available: ${err.detail}`;
    els.modelsNote.hidden = false;
    return;
  }
  const models = (data && data.models) || [];
  els.models.replaceChildren(...models.map(renderModel));
  els.modelsNote.textContent = models.length ? "" : "No model is loaded.";
  els.modelsNote.hidden = models.length > 0;
}

function figureText(value) {
  if (value === null || value === undefined) return "not measured";
  return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(3);
}

function metricsText(metrics) {
  const parts = [];
  for (const [name, value] of Object.entries(metrics || {})) {
    if (value !== null && typeof value === "object") {
      const inner = Object.entries(value).map(([k, v]) => `${k} ${figureText(v)}`);
      parts.push(`${name}: ${inner.join(", ")}`);
    } else {
      parts.push(`${name} ${figureText(value)}`);
    }
  }
  return parts.join("; ") || "none";
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// One line for the model, then its whole card (GET /models/{name}/card) behind a disclosure.
function renderModel(model) {
  const card = model.card;
  const item = element("li", undefined, "model");
  item.dataset.name = model.name;
  const line = element("p", undefined, "model-summary");
  line.append(element("strong", `${model.name} ${model.version}`), ` (${model.kind}): `);
  line.append(card ? card.summary : "no model card");
  item.append(line);
  if (!card) return item;
  const details = element("details", undefined, "model-card");
  details.append(element("summary", "Model card"));
  const list = element("dl");
  const add = (term, ...values) => {
    list.append(element("dt", term));
    for (const value of values) {
      const dd = element("dd");
      dd.append(value);
      list.append(dd);
    }
  };
  const code = (text) => element("code", text);
  add("Trained on", card.domain);
  add("Intended use", card.intended_use);
  const limits = element("ul");
  limits.append(...card.limitations.map((text) => element("li", text)));
  add("Known limits", limits);
  const sizes = Object.entries(card.data.sizes).map(([k, v]) => `${k.replaceAll("_", " ")} ${figureText(v)}`);
  add("Training data", `${card.data.description}${sizes.length ? ` (${sizes.join(", ")})` : ""}`);
  if (card.data.command) add("Data command", code(card.data.command));
  if (card.training.command) add("Training command", code(card.training.command));
  add(
    "Vocabulary",
    `${card.vocabulary_size} tokens` + (card.answers ? `; ${card.answers} possible answers` : ""),
  );
  if (card.validation) {
    const epoch = card.validation.epoch ? ` (epoch ${card.validation.epoch})` : "";
    add(`Validation${epoch}`, metricsText(card.validation.metrics));
  }
  for (const test of card.tests) {
    add(`Test: ${test.data}`, metricsText(test.metrics), code(test.command));
  }
  details.append(list);
  item.append(details);
  return item;
}

// -- the image -------------------------------------------------------------------------------------

function setImage(blob, reference) {
  state.generation += 1;
  state.image = blob;
  state.caption = null;
  state.draft = null;
  state.vqa = null;
  state.pinned = null;
  state.domainCheck = {};
  renderDomainNotice();
  if (state.url) URL.revokeObjectURL(state.url);
  state.url = URL.createObjectURL(blob);
  els.photo.alt = reference ? `Sample scene: ${reference.captions[0]}` : `Uploaded image ${blob.name || ""}`.trim();
  els.photo.src = state.url;
  els.stage.hidden = false;
  hideHeat();
  clearError();
  els.answer.hidden = true;
  renderCaption(null);
  if (reference) {
    els.reference.textContent = `Reference caption: ${reference.captions[0]}`;
    els.reference.hidden = false;
    renderSuggestions(reference.questions.map((q) => q.question).slice(0, 4));
  } else {
    els.reference.hidden = true;
    renderSuggestions(DEFAULT_QUESTIONS);
  }
  runCaption();
}

// A file the browser cannot show (a text file: the API answers 415) leaves no broken-image box.
function hideBrokenImage() {
  if (els.photo.src === state.url) els.stage.hidden = true;
}

function fitFrame() {
  const { naturalWidth: w, naturalHeight: h } = els.photo;
  if (w && h) els.frame.style.setProperty("--aspect", String(w / h));
}

async function loadSample() {
  const seed = Math.floor(Math.random() * 1_000_000);
  els.sample.disabled = true;
  try {
    const scene = await api(`samples/scene?seed=${seed}`);
    const response = await fetch(`samples/scene.png?seed=${scene.seed}&size=${scene.size}`);
    if (!response.ok) throw new ApiError(response.status, `the sample image answered ${response.status}`);
    const blob = await response.blob();
    setImage(new File([blob], `scene-${scene.seed}.png`, { type: "image/png" }), scene);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      err.detail = "this server does not offer sample scenes; upload an image instead";
    }
    showError(err, "Loading a sample scene");
  } finally {
    els.sample.disabled = false;
  }
}

// -- caption and word attention ---------------------------------------------------------------------

// The caption streams in (POST /caption/stream): each word is shown as soon as the search has
// fixed it, its attention map already on hover, then the result is rendered in their place. A new
// image or beam size aborts the request under way, which also stops the server's search for it.
async function runCaption() {
  if (!state.image) return;
  if (state.captionRun) state.captionRun.abort();
  const run = new AbortController();
  state.captionRun = run;
  const current = () => state.captionRun === run;
  const body = new FormData();
  body.append("image", state.image, state.image.name || "image");
  const query = new URLSearchParams({ beam_size: els.beam.value, attention: "grid" });
  setBusy(els.captionPanel, true);
  // A busy live region is announced once it is done: the whole caption, not word by word.
  els.caption.setAttribute("aria-busy", "true");
  els.captionEmpty.textContent = "Captioning…";
  els.captionEmpty.hidden = false;
  state.draft = null;
  try {
    const result = await apiStream(
      `caption/stream?${query}`,
      { method: "POST", body, signal: run.signal },
      (word) => current() && addWord(word),
    );
    if (!current()) return;
    clearError();
    const focused = els.caption.contains(document.activeElement) && document.activeElement.dataset.index;
    state.caption = result;
    state.draft = null;
    renderCaption(result);
    // The new words take over the streamed ones' highlight, pin and keyboard focus.
    if (state.shown && state.shown.kind === "word") show(state.shown);
    if (focused) {
      const word = els.caption.querySelector(`.word[data-index="${focused}"]`);
      if (word) word.focus();
    }
    checkDomain("caption", result);
  } catch (err) {
    if (!current() || err.name === "AbortError") return; // a newer request took over
    if (state.draft) {
      // the words so far are not a caption
      state.draft = null;
      renderCaption(null);
      show(state.pinned);
    }
    els.captionEmpty.textContent = "No caption.";
    if (err.status === 401) state.retry = runCaption;
    showError(err, "Captioning");
  } finally {
    if (current()) {
      state.captionRun = null;
      setBusy(els.captionPanel, false);
      els.caption.setAttribute("aria-busy", "false");
    }
  }
}

// One streamed word (a `word` event's data); the first replaces the caption shown before.
function addWord(word) {
  if (!state.draft) {
    state.draft = { tokens: [], maps: [] };
    state.caption = null;
    if (state.pinned && state.pinned.kind === "word") state.pinned = null;
    els.caption.replaceChildren();
    els.captionMeta.textContent = "";
    els.captionCut.hidden = true;
    els.captionEmpty.hidden = true;
    els.caption.hidden = false;
    show(state.pinned); // no map of the old caption's words stays on show
  }
  const map = (word.attention && word.attention.map) || null;
  state.draft.tokens[word.index] = word.token;
  state.draft.maps[word.index] = map;
  if (word.index > 0 && !PUNCTUATION.test(word.token)) els.caption.append(" ");
  els.caption.append(wordElement(word.token, word.index, word.probability, map !== null));
  if (map) els.captionHelp.hidden = false;
}

// The caption's words and their attention maps: the result's, or while it streams, those so far.
function captionWords() {
  if (state.draft) return state.draft;
  const result = state.caption;
  if (!result) return null;
  return { tokens: result.tokens, maps: (result.attention && result.attention.maps) || [] };
}

const PUNCTUATION = /^[^\p{L}\p{N}]+$/u;

// A word of the caption: a button that shows its attention map when it has one, else plain text.
function wordElement(token, index, probability, hasMap) {
  const word = document.createElement(hasMap ? "button" : "span");
  word.className = "word";
  word.textContent = token;
  word.dataset.index = String(index);
  word.title = `probability ${(probability * 100).toFixed(1)}%`;
  if (!hasMap) return word;
  word.type = "button";
  word.setAttribute("aria-pressed", "false");
  word.setAttribute("aria-label", `${token}: show its attention map`);
  // On pointer movement, not mouseenter: Chromium sends mouseenter (and no mousemove) to the
  // word that a scroll brings under a still pointer, which would replace a just-pinned map.
  word.addEventListener("mousemove", () => {
    if (els.heat.dataset.target !== `word:${index}`) preview({ kind: "word", index });
  });
  word.addEventListener("focus", () => preview({ kind: "word", index }));
  word.addEventListener("mouseleave", () => preview(null));
  word.addEventListener("blur", () => preview(null));
  word.addEventListener("click", () => {
    togglePin({ kind: "word", index });
    revealImage();
  });
  return word;
}

function renderCaption(result) {
  els.caption.replaceChildren();
  els.captionMeta.textContent = "";
  els.captionCut.hidden = true;
  if (!result) {
    els.caption.hidden = true;
    els.captionHelp.hidden = true;
    els.captionEmpty.textContent = state.image ? "Captioning…" : "Choose an image to caption it.";
    els.captionEmpty.hidden = false;
    return;
  }
  const hasMaps = Boolean(result.attention && result.attention.maps);
  result.tokens.forEach((token, index) => {
    if (index > 0 && !PUNCTUATION.test(token)) els.caption.append(" ");
    const p = Math.exp(result.token_logprobs[index] ?? 0);
    els.caption.append(wordElement(token, index, p, hasMaps));
  });
  if (result.tokens.length === 0) els.caption.textContent = "(the model wrote an empty caption)";
  const cut = result.finished === false;
  if (cut) {
    const mark = document.createElement("span");
    mark.className = "cut-mark";
    mark.textContent = "…";
    mark.setAttribute("aria-hidden", "true");
    els.caption.append(mark);
    const n = result.tokens.length;
    els.captionCut.textContent =
      `Unfinished: cut at ${n} word${n === 1 ? "" : "s"}, before the model ended the caption.`;
  }
  els.captionCut.hidden = !cut;
  els.caption.hidden = false;
  els.captionEmpty.hidden = true;
  els.captionHelp.hidden = !hasMaps;
  const model = result.model ? `${result.model.name} ${result.model.version}` : "";
  els.captionMeta.textContent =
    `Model ${model}, beam size ${els.beam.value}` +
    (hasMaps ? "" : "; this model has no attention maps");
}

// -- question answering -----------------------------------------------------------------------------

function renderSuggestions(questions) {
  els.suggestions.replaceChildren(
    ...questions.map((q) => {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.textContent = q;
      chip.addEventListener("click", () => {
        els.question.value = q;
        runAsk();
      });
      return chip;
    }),
  );
}

async function runAsk() {
  const question = els.question.value.trim();
  if (!state.image) {
    showError(new ApiError(-1, "choose or generate an image first"), "Asking");
    return;
  }
  if (!question) {
    showError(new ApiError(-1, "type a question first"), "Asking");
    els.question.focus();
    return;
  }
  const generation = state.generation;
  const body = new FormData();
  body.append("image", state.image, state.image.name || "image");
  body.append("question", question);
  const query = new URLSearchParams({ top_k: String(TOP_K), attention: "grid" });
  setBusy(els.askPanel, true);
  els.askButton.disabled = true;
  try {
    const result = await api(`vqa?${query}`, { method: "POST", body });
    if (generation !== state.generation) return;
    clearError();
    state.vqa = result;
    renderAnswer(result);
    checkDomain("vqa", result);
  } catch (err) {
    if (generation !== state.generation) return;
    if (err.status === 401) state.retry = runAsk;
    showError(err, "Answering the question");
  } finally {
    setBusy(els.askPanel, false);
    els.askButton.disabled = state.vqaOff;
  }
}

function percent(p) {
  return `${(p * 100).toFixed(p >= 0.995 || p < 0.1 ? 1 : 0)}%`;
}

function quoted(words) {
  return words.map((w) => `“${w}”`).join(", ");
}

function renderAnswer(result) {
  els.answerText.textContent = result.answer;
  els.confidence.textContent = `${percent(result.confidence)} confident`;
  const unknown = result.unknown_words || [];
  els.unknownWords.textContent = unknown.length
    ? `The model does not know ${unknown.length === 1 ? "the word" : "the words"} ` +
      `${quoted(unknown)}: it reads ${unknown.length === 1 ? "it" : "them"} as “unknown”.`
    : "";
  els.unknownWords.hidden = unknown.length === 0;
  const guess = result.known_content_words === false;
  els.guessNote.textContent = guess
    ? "The model knows none of the words this question is about, so the answer cannot depend " +
      "on them: treat it as a guess, whatever its confidence."
    : "";
  els.guessNote.hidden = !guess;
  els.topAnswers.replaceChildren(
    ...result.top_answers.map(({ answer, probability }) => {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.className = "top-name";
      name.textContent = answer;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("role", "presentation");
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "top-value";
      value.textContent = percent(probability);
      item.append(name, bar, value);
      return item;
    }),
  );
  const glimpses = (result.attention && result.attention.maps) || [];
  const hasMaps = glimpses.length > 0;
  els.glimpses.replaceChildren(
    ...glimpses.map((_, glimpse) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "secondary glimpse";
      button.dataset.glimpse = String(glimpse);
      button.setAttribute("aria-pressed", "false");
      button.textContent = glimpses.length > 1 ? `Glimpse ${glimpse + 1}` : "Where it looked";
      button.addEventListener("click", () => {
        pin({ kind: "answer", glimpse }); // the glimpses act as radio buttons
        revealImage();
      });
      return button;
    }),
  );
  els.glimpses.hidden = !hasMaps;
  const model = result.model ? `${result.model.name} ${result.model.version}` : "";
  els.answerMeta.textContent = `Model ${model}` + (hasMaps ? "" : "; this model has no attention maps");
  els.answer.hidden = false;
  if (hasMaps) pin({ kind: "answer", glimpse: 0 });
}

// -- the domain check --------------------------------------------------------------------------------

// What each model was trained on, in plain words (its domain statistics' description), fetched
// once; a failed fetch (e.g. no API key yet) is tried again next time.
function modelDomains() {
  if (!state.domains) {
    state.domains = api("models")
      .then((body) => {
        const domains = {};
        for (const model of (body && body.models) || []) {
          if (model.domain && model.domain.description) domains[model.name] = model.domain.description;
        }
        return domains;
      })
      .catch(() => {
        state.domains = null;
        return {};
      });
  }
  return state.domains;
}

function checkDomain(task, result) {
  state.domainCheck[task] = result;
  renderDomainNotice();
}

// One paragraph per training domain: the models that find the image unlike their training images
// (in_domain false), what those were, and what of the page to doubt.
async function renderDomainNotice() {
  const generation = state.generation;
  // Which responses for this image were checked ("caption vqa"): tests wait on it.
  els.domainNotice.dataset.checked = Object.keys(state.domainCheck).sort().join(" ");
  const flagged = Object.entries(state.domainCheck).filter(([, r]) => r && r.in_domain === false);
  if (flagged.length === 0) {
    els.domainNotice.hidden = true;
    els.domainNotice.replaceChildren();
    return;
  }
  const domains = await modelDomains();
  if (generation !== state.generation) return;
  const groups = new Map(); // description (or the model's name when unknown) -> its models
  for (const [task, result] of flagged) {
    const name = (result.model && result.model.name) || (task === "vqa" ? "the VQA model" : "the captioner");
    const key = domains[name] || `?${name}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push({ name, task, score: result.domain_score });
  }
  const and = (items) => items.join(" and ");
  const paragraphs = [...groups.entries()].map(([key, models]) => {
    const names = and(models.map((m) => m.name));
    const trained = key.startsWith("?") ? "on images of one narrow kind" : `only on ${key}`;
    const scores = and(models.map((m) => m.score.toFixed(2)));
    const doubt = and(models.map((m) => (m.task === "vqa" ? "the answers" : "the caption")));
    const p = document.createElement("p");
    const title = document.createElement("strong");
    title.textContent = "This image is unlike what the model knows. ";
    p.append(
      title,
      `${names} ${models.length > 1 ? "were" : "was"} trained ${trained}. This image looks ` +
        `unlike them (domain score${models.length > 1 ? "s" : ""} ${scores}), so ${doubt} ` +
        "may well be wrong.",
    );
    p.dataset.models = models.map((m) => m.name).join(" ");
    return p;
  });
  els.domainNotice.replaceChildren(...paragraphs);
  els.domainNotice.hidden = false;
}

// -- attention maps over the image ------------------------------------------------------------------

function mapFor(target) {
  if (!target) return null;
  if (target.kind === "word") {
    const words = captionWords();
    if (!words || !words.maps[target.index]) return null;
    return { map: words.maps[target.index], label: `Attention for the word “${words.tokens[target.index]}”` };
  }
  const maps = state.vqa && state.vqa.attention && state.vqa.attention.maps;
  if (!maps || !maps[target.glimpse]) return null;
  const glimpse = maps.length > 1 ? ` (glimpse ${target.glimpse + 1} of ${maps.length})` : "";
  return { map: maps[target.glimpse], label: `Attention for the answer “${state.vqa.answer}”${glimpse}` };
}

function sameTarget(a, b) {
  return Boolean(a && b && a.kind === b.kind && a.index === b.index && a.glimpse === b.glimpse);
}

function preview(target) {
  show(target || state.pinned);
}

function pin(target) {
  state.pinned = target;
  show(target);
}

function togglePin(target) {
  pin(sameTarget(state.pinned, target) ? null : target);
}

// On a phone the image may have scrolled away above the caption: bring it back into view. Not
// when most of it is in view: beside the caption a tall image may end a little below the fold,
// and scrolling for that moves the caption under the pointer.
function revealImage() {
  if (els.heat.hidden) return;
  const box = els.frame.getBoundingClientRect();
  const inView = Math.min(box.bottom, window.innerHeight) - Math.max(box.top, 0);
  if (inView >= box.height / 2) return;
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  els.frame.scrollIntoView({ block: "nearest", behavior: still ? "auto" : "smooth" });
}

function show(target) {
  const found = mapFor(target);
  for (const word of els.caption.querySelectorAll(".word")) {
    const on = target && target.kind === "word" && Number(word.dataset.index) === target.index;
    word.classList.toggle("active", Boolean(on));
    if (word.hasAttribute("aria-pressed")) {
      const pinned = sameTarget(state.pinned, { kind: "word", index: Number(word.dataset.index) });
      word.setAttribute("aria-pressed", pinned ? "true" : "false");
    }
  }
  for (const button of els.glimpses.querySelectorAll(".glimpse")) {
    const pinned = sameTarget(state.pinned, { kind: "answer", glimpse: Number(button.dataset.glimpse) });
    button.setAttribute("aria-pressed", pinned ? "true" : "false");
  }
  if (!found) {
    hideHeat();
    return;
  }
  drawHeat(found.map);
  state.shown = target;
  els.heat.dataset.target = target.kind === "word" ? `word:${target.index}` : `answer:${target.glimpse}`;
  els.heatLabel.textContent = found.label;
}

function hideHeat() {
  els.heat.hidden = true;
  state.shown = null;
  delete els.heat.dataset.target;
  const words = captionWords();
  els.heatLabel.textContent = words && words.maps.some(Boolean)
    ? "Hover over or tap a word to see where the model looked."
    : "";
}

// Upsample the (h, w) map bilinearly to the canvas (pixel centres, as PIL does), divide by its peak
// and colour it with viridis: the same picture as the server's attention=png overlays.
function drawHeat(map) {
  const h = map.length;
  const w = h ? map[0].length : 0;
  const nw = els.photo.naturalWidth || 1;
  const nh = els.photo.naturalHeight || 1;
  if (!h || !w) return hideHeat();
  const scale = HEAT_SIDE / Math.max(nw, nh);
  const W = Math.max(1, Math.round(nw * scale));
  const H = Math.max(1, Math.round(nh * scale));
  els.heat.width = W;
  els.heat.height = H;
  let peak = 0;
  for (const row of map) for (const v of row) peak = Math.max(peak, v);
  const ctx = els.heat.getContext("2d");
  const pixels = ctx.createImageData(W, H);
  const alpha = Math.round(HEAT_ALPHA * 255);
  const cols = new Array(W);
  for (let x = 0; x < W; x++) {
    const u = Math.min(w - 1, Math.max(0, ((x + 0.5) * w) / W - 0.5));
    const x0 = Math.floor(u);
    cols[x] = [x0, Math.min(w - 1, x0 + 1), u - x0];
  }
  for (let y = 0; y < H; y++) {
    const v = Math.min(h - 1, Math.max(0, ((y + 0.5) * h) / H - 0.5));
    const y0 = Math.floor(v);
    const y1 = Math.min(h - 1, y0 + 1);
    const fy = v - y0;
    const top = map[y0];
    const bottom = map[y1];
    for (let x = 0; x < W; x++) {
      const [x0, x1, fx] = cols[x];
      const a = top[x0] + (top[x1] - top[x0]) * fx;
      const b = bottom[x0] + (bottom[x1] - bottom[x0]) * fx;
      const value = a + (b - a) * fy;
      const t = peak > 0 ? value / peak : 0;
      const [r, g, bl] = VIRIDIS[Math.max(0, Math.min(255, Math.round(t * 255)))];
      const k = (y * W + x) * 4;
      pixels.data[k] = r;
      pixels.data[k + 1] = g;
      pixels.data[k + 2] = bl;
      pixels.data[k + 3] = alpha;
    }
  }
  ctx.putImageData(pixels, 0, 0);
  els.heat.hidden = false;
}

// -- the API key -------------------------------------------------------------------------------------

function saveKey(event) {
  event.preventDefault();
  const key = els.key.value.trim();
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage blocked: api() falls back to the field's value
  }
  els.keyState.textContent = key ? "Key saved for this tab." : "No key set.";
  showKeyBadge();
  const retry = state.retry;
  state.retry = null;
  if (key) loadModels();
  if (key && retry) {
    clearError();
    retry();
  }
}

function forgetKey() {
  try {
    sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // nothing stored
  }
  els.key.value = "";
  els.keyState.textContent = "Key forgotten.";
  showKeyBadge();
}

function showKeyBadge() {
  els.keyBadge.textContent = apiKey() ? "(set for this tab)" : "";
}

// -- wiring ------------------------------------------------------------------------------------------

function init() {
  Object.assign(els, {
    status: $("status"),
    error: $("error"),
    keyPanel: $("key-panel"),
    keyForm: $("key-form"),
    key: $("api-key"),
    keyForget: $("key-forget"),
    keyState: $("key-state"),
    keyBadge: $("key-badge"),
    drop: $("drop"),
    file: $("file"),
    sample: $("sample"),
    stage: $("stage"),
    frame: $("frame"),
    photo: $("photo"),
    heat: $("heat"),
    heatLabel: $("heat-label"),
    domainNotice: $("domain-notice"),
    captionPanel: $("caption-panel"),
    beam: $("beam"),
    caption: $("caption"),
    captionEmpty: $("caption-empty"),
    captionHelp: $("caption-help"),
    captionMeta: $("caption-meta"),
    captionCut: $("caption-cut"),
    reference: $("reference"),
    askPanel: $("ask-panel"),
    askForm: $("ask-form"),
    question: $("question"),
    askButton: $("ask"),
    suggestions: $("suggestions"),
    vqaNote: $("vqa-note"),
    answer: $("answer"),
    answerText: $("answer-text"),
    confidence: $("confidence"),
    unknownWords: $("unknown-words"),
    guessNote: $("guess-note"),
    glimpses: $("glimpses"),
    topAnswers: $("top-answers"),
    answerMeta: $("answer-meta"),
    modelsNote: $("models-note"),
    models: $("models"),
  });

  const stored = apiKey();
  if (stored) {
    els.key.value = stored;
    els.keyState.textContent = "Using the key saved in this tab.";
  }
  showKeyBadge();
  els.keyForm.addEventListener("submit", saveKey);
  els.keyForget.addEventListener("click", forgetKey);

  els.file.addEventListener("change", () => {
    const [file] = els.file.files;
    if (file) setImage(file, null);
  });
  els.sample.addEventListener("click", loadSample);
  els.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    els.drop.classList.add("dragging");
  });
  els.drop.addEventListener("dragleave", () => els.drop.classList.remove("dragging"));
  els.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    els.drop.classList.remove("dragging");
    const [file] = event.dataTransfer.files;
    if (file) setImage(file, null);
  });
  els.photo.addEventListener("load", fitFrame);
  els.photo.addEventListener("error", hideBrokenImage);
  els.beam.addEventListener("change", runCaption);
  els.askForm.addEventListener("submit", (event) => {
    event.preventDefault();
    runAsk();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") pin(null);
  });

  renderSuggestions(DEFAULT_QUESTIONS);
  checkReady();
}

document.addEventListener("DOMContentLoaded", init);
