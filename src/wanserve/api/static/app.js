// The web page: a thin client of the same /v1 routes the OpenAI SDK uses (docs/api.md). Every URL is relative,
// so the page also works behind a proxy that serves wanserve under a path prefix. User text (prompts, errors)
// is only ever set as textContent, never as HTML.

const KEY_STORAGE = "wanserve.api_key";
const PAGE = 20;
const MAX_PAGE = 100; // the list route's largest `limit`: more is read page by page
const BUSY_POLL_MS = 1000;
const IDLE_POLL_MS = 5000;
const MODELS_EVERY_MS = 10000;
const BUSY_MODELS_EVERY_MS = 2000; // while videos run, the queue line under the model moves with their cards
const STAGES = {
  encode_prompt: "encoding the prompt",
  denoise: "denoising",
  vae_decode: "decoding frames",
  video_encode: "writing the MP4",
};
// Short, so a phone shows them whole; the hint below the select says what each trades.
const PRESETS = { exact: "exact", fast: "fast, lossy", fastest: "fastest, lossy" };
// Request fields the server may name in an error, and the form control that holds each.
const CONTROL_OF_FIELD = {
  width: "size",
  height: "size",
  seconds: "num_frames",
  image: "input_reference",
  image_url: "input_reference",
};
// An HTTP header carries Latin-1 only: a key pasted with a zero-width space or a curly quote could never be sent.
// Printable ASCII, as the server takes a key (a passphrase's inner spaces included); the ends are trimmed.
const KEY_CHARACTERS = /^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/;

const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || localStorage.getItem(KEY_STORAGE) || "",
  keyChecked: false, // the server has taken the key at least once
  rememberKey: Boolean(localStorage.getItem(KEY_STORAGE)),
  models: new Map(),
  limit: PAGE,
  cards: new Map(), // job id -> <li>
  blobUrls: new Map(), // job id -> object URLs made for it (only when a key is needed)
  gone: new Set(), // ids deleted from this page: a list answer already on its way must not bring them back
  epoch: 0, // bumped by every change made here; a list answer from an older epoch is dropped
  polling: false,
  busy: false, // the last list held an unfinished video
  timer: null,
  modelsAt: 0,
  // The create's Idempotency-Key, kept with what it sent while its answer may have been lost (no answer, or a
  // 5xx from a proxy after the server took it): Generate pressed again for the same video sends the same key,
  // and the server answers with the job it already made instead of queueing a second one.
  create: null, // {key, sent}
};

class ApiError extends Error {
  constructor(status, message, param, code) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

// Seeds run to 2^63 - 1, past what a JavaScript number holds exactly: keep the digits as sent.
function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    key === "seed" && typeof value === "number" && context && context.source ? context.source : value,
  );
}

async function call(path, options = {}) {
  let response;
  try {
    const headers = new Headers(options.headers || {});
    if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new ApiError(0, `the server cannot be reached (${error.message})`);
  }
  if (response.ok) {
    if (state.key && !state.keyChecked) keyAccepted();
    return response;
  }
  let error = {};
  try {
    error = parseJson(await response.text()).error || {};
  } catch {
    // not JSON: a proxy's page, whose status line alone says no more than "503 Service Unavailable"
  }
  const unavailable = response.status >= 502 && response.status <= 504;
  const proxy = unavailable ? ": the server, or a proxy before it, is unavailable; try again shortly" : "";
  const message = error.message || `${response.status} ${response.statusText}${proxy}`;
  if (response.status === 401) askForKey(state.key ? "the server refused this key" : "");
  throw new ApiError(response.status, message, error.param, error.code);
}

async function callJson(path, options) {
  return parseJson(await (await call(path, options)).text());
}

// Keys ------------------------------------------------------------------------------------------------------

function askForKey(message) {
  if (state.key && !state.keyChecked) forgetKey(); // a key never accepted is not kept for the next visit
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("create").hidden = true;
  $("jobs-section").hidden = true;
  $("forget-key").hidden = !state.key;
  showServerState("");
  $("key").focus();
}

function keyAccepted() {
  state.keyChecked = true;
  (state.rememberKey ? localStorage : sessionStorage).setItem(KEY_STORAGE, state.key);
}

function forgetKey() {
  localStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = "";
  state.keyChecked = false;
}

function useKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!KEY_CHARACTERS.test(key)) {
    $("key-error").textContent = "an API key is printable ASCII (no tabs, line breaks or non-ASCII): check what was pasted";
    $("key").focus();
    return;
  }
  forgetKey();
  state.key = key;
  state.rememberKey = $("remember-key").checked;
  $("key").value = "";
  state.modelsAt = 0;
  schedule(0);
}

function showServerState(text, bad = false) {
  const node = $("server-state");
  node.textContent = text;
  node.classList.toggle("bad", bad);
}

// What one refresh has to say is said together: a card gone and another finished in the same refresh each
// replaced the other's words, and a screen reader heard only the last.
let toAnnounce = [];
function announce(text) {
  toAnnounce.push(text);
  if (toAnnounce.length > 1) return;
  queueMicrotask(() => {
    $("announcer").textContent = toAnnounce.join(". ");
    toAnnounce = [];
  });
}

// Models ------------------------------------------------------------------------------------------------

async function loadModels() {
  const body = await callJson("v1/models");
  state.modelsAt = Date.now();
  const select = $("model");
  const chosen = select.value;
  state.models = new Map(body.data.map((model) => [model.id, model]));
  if (select.options.length !== state.models.size || [...select.options].some((o) => !state.models.has(o.value))) {
    select.replaceChildren(...body.data.map((model) => new Option(model.id, model.id)));
    if (state.models.has(chosen)) select.value = chosen;
    else if (chosen) {
      // Gone from the server (a restart with other models): said, not switched under the user's hands unseen.
      $("create-error").textContent = `model ${chosen} is no longer served here; ${select.value} is chosen instead`;
      announce($("create-error").textContent);
    }
    fitFormToModel();
  }
  showModelInfo();
  const keyWasAsked = !$("key-form").hidden;
  $("key-form").hidden = true;
  $("create").hidden = false;
  $("jobs-section").hidden = false;
  // The key form, with the focus in it, has just gone: the prompt is what comes next.
  if (keyWasAsked && (document.activeElement === document.body || $("key-form").contains(document.activeElement))) {
    $("prompt").focus();
  }
  $("forget-key").hidden = !state.key;
}

function currentModel() {
  return state.models.get($("model").value);
}

function showModelInfo() {
  const model = currentModel();
  if (!model) return;
  const waiting = model.queue_depth === 1 ? "1 video waiting" : `${model.queue_depth} videos waiting`;
  $("model-info").textContent = `${model.tasks.join(", ")} · ${waiting} · ${model.running} running`;
}

// Set the form's choices and hints from the chosen model's defaults and limits (GET /v1/models).
function fitFormToModel() {
  const model = currentModel();
  if (!model) return;
  const d = model.defaults;
  const limits = model.limits;
  const takesText = model.tasks.includes("t2v") || model.tasks.includes("ti2v");
  const takesImage = model.tasks.includes("i2v") || model.tasks.includes("ti2v");
  $("image-row").hidden = !takesImage;
  $("input_reference").required = !takesText;
  $("image-hint").textContent = takesText ? "optional: the video starts from it" : "required: the video starts from it";
  if (!takesImage) $("input_reference").value = "";

  // Any WIDTHxHEIGHT the model takes may be typed; its listed sizes are offered.
  const sizes = new Set([`${d.width}x${d.height}`, ...model.sizes]);
  $("sizes").replaceChildren(...[...sizes].map((size) => new Option(size, size)));
  $("size").placeholder = `${d.width}x${d.height}${takesImage ? ", or the image's shape" : ""}`;
  $("size-hint").textContent =
    `multiples of ${limits.size_multiple}, at most ${limits.max_side} a side and ` +
    `${limits.max_pixels.toLocaleString()} pixels`;

  const frames = $("num_frames");
  frames.step = limits.frame_stride;
  frames.max = limits.max_frames;
  frames.placeholder = `${d.num_frames} (${d.seconds} s at ${d.fps} fps)`;
  $("num_inference_steps").placeholder = d.num_inference_steps;
  $("guidance_scale").placeholder = d.guidance_scale;
  // What was typed stays where this model takes it too (steps and guidance: every model's rules are the same);
  // what it cannot take is cleared, and said, where it used to be cleared all, without a word.
  const cleared = ["size", "num_frames"].filter((name) => $(name).value.trim() && !takes(model, name, $(name).value));
  for (const name of cleared) $(name).value = "";
  if (cleared.length) announce(`${cleared.join(" and ")} cleared: ${model.id} does not take the value given`);

  // The workers' own preset (sent as nothing), or another one a request may ask them for; a choice made for
  // one model stays when another is picked, where that one offers it too.
  const presets = model.presets || { served: "exact", per_request: [] };
  const others = presets.per_request.filter((name) => name !== presets.served);
  const chosen = $("preset").value;
  const served = new Option(`${PRESETS[presets.served] || presets.served}: the server's`, "");
  $("preset").replaceChildren(served, ...others.map((name) => new Option(PRESETS[name] || name, name)));
  if (others.includes(chosen)) $("preset").value = chosen;
  $("preset-label").hidden = $("preset-row").hidden = others.length === 0;
  // Only the presets offered here: each one's words, said once.
  const offered = new Set([presets.served, ...others]);
  const words = {
    exact: "exact: the reference output",
    fast: "fast reuses steps that barely change",
    fastest: "fastest also uses 8-bit maths on GPUs that have it",
  };
  $("preset-hint").textContent = Object.keys(words)
    .filter((name) => offered.has(name))
    .map((name) => words[name])
    .join("; ");
}

// Whether `model` takes a size or frame count typed for another (the server's rules, from its limits).
function takes(model, name, text) {
  const limits = model.limits;
  if (name === "size") {
    const match = /^\s*(\d+)\s*[xX*×]\s*(\d+)\s*$/.exec(text);
    if (!match) return false;
    const [width, height] = [Number(match[1]), Number(match[2])];
    const fits = (side) => side > 0 && side % limits.size_multiple === 0 && side <= limits.max_side;
    return fits(width) && fits(height) && width * height <= limits.max_pixels;
  }
  const frames = Number(text);
  const inRange = Number.isInteger(frames) && frames >= 1 && frames <= limits.max_frames;
  return inRange && (frames - 1) % limits.frame_stride === 0;
}

// Creating a video ------------------------------------------------------------------------------------------

function clearFieldErrors() {
  for (const node of document.querySelectorAll("#create [aria-invalid]")) node.removeAttribute("aria-invalid");
  $("create-error").textContent = "";
}

function showCreateError(error) {
  $("create-error").textContent = error.message;
  const name = CONTROL_OF_FIELD[error.param] || error.param;
  const control = name && document.querySelector(`#create [name="${CSS.escape(name)}"]`);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    if (control.closest("details")) control.closest("details").open = true;
    control.focus();
  } else {
    $("generate").focus();
  }
}

// A number input holding what is not a number (`7,5`) reads as empty: it would be dropped without a word.
function unreadableNumber() {
  return [...document.querySelectorAll("#create input[type=number]")].find((input) => input.validity.badInput);
}

async function createVideo(event) {
  event.preventDefault();
  clearFieldErrors();
  const form = $("create");
  const prompt = $("prompt").value;
  if (!prompt.trim()) {
    showCreateError(new ApiError(0, "prompt: write what the video should show", "prompt"));
    return;
  }
  if ($("input_reference").required && !$("input_reference").files.length) {
    showCreateError(new ApiError(0, "input_reference: this model starts from an image; choose one", "input_reference"));
    return;
  }
  const bad = unreadableNumber();
  if (bad) {
    showCreateError(new ApiError(0, `${bad.name}: must be a number (use . for decimals)`, bad.name));
    return;
  }
  // Empty inputs count as not given (the server reads them so too); the file input only when a file is chosen.
  const body = new FormData();
  for (const [name, value] of new FormData(form)) {
    if (value instanceof File ? value.size > 0 || value.name : value.trim() !== "") body.append(name, value);
  }
  // A form sends newlines as CR LF; the prompt the model reads has the user's newlines.
  for (const name of ["prompt", "negative_prompt"]) {
    if (body.has(name)) body.set(name, $(name).value.replace(/\r\n?/g, "\n"));
  }
  const sent = fingerprint(body);
  if (!state.create || state.create.sent !== sent) state.create = { key: newKey(), sent };
  const button = $("generate");
  button.disabled = true;
  try {
    const headers = { "Idempotency-Key": state.create.key };
    const video = await callJson("v1/videos", { method: "POST", body, headers });
    state.create = null;
    state.epoch += 1;
    state.modelsAt = 0; // its queue line counts this video from the next refresh
    showJob(video, true);
    announce(`video queued${video.queue_position ? `, number ${video.queue_position} in the queue` : ""}`);
    schedule(0);
  } catch (error) {
    if (error.status !== 0 && error.status < 500) state.create = null; // refused: nothing was made
    else error.message += ". The video may have been queued: pressing Generate again will not make a second one";
    if (error.status !== 401) showCreateError(error);
  } finally {
    button.disabled = false;
    if (document.activeElement === document.body) button.focus();
  }
}

// Visible ASCII, as the header takes; crypto.randomUUID is missing where the page is not served over https.
function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `page-${[...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("")}`;
}

// What a create sends, to tell a retry of the same video from a new one (an image by its name, size and date).
function fingerprint(body) {
  const parts = [];
  for (const [name, value] of body) {
    parts.push([name, value instanceof File ? [value.name, value.size, value.lastModified] : value]);
  }
  return JSON.stringify(parts);
}

// The list of videos ---------------------------------------------------------------------------------------

function statusWord(video) {
  if (video.status === "failed" && video.error && video.error.code === "cancelled") return "cancelled";
  return video.status.replace("_", " ");
}

function unfinished(video) {
  return video.status === "queued" || video.status === "in_progress";
}

function detailOf(video) {
  if (video.status === "queued") {
    return video.queue_position ? `#${video.queue_position} in the queue` : "queued";
  }
  if (video.status === "in_progress") {
    const stage = STAGES[video.stage] || video.stage || "starting";
    const cancelling = video.cancel_requested ? " · cancelling: it stops after the current step" : "";
    return `${stage} · ${video.progress}%${cancelling}`;
  }
  const parts = [`${video.seconds} s`, `${video.num_frames} frames at ${video.fps} fps`, `seed ${video.seed}`];
  if (video.timings && video.timings.total != null) parts.push(`made in ${video.timings.total.toFixed(1)} s`);
  if (video.preset && video.preset !== "exact") {
    const reused = video.step_cache ? `, ${Math.round(video.step_cache.skipped_fraction * 100)}% of steps reused` : "";
    // fastest's FP8 needs a GPU that takes it: where it did not, the card says so rather than the name alone.
    const applied = video.accelerations; // null before it is done, and on results from before the field
    const noFp8 = video.preset === "fastest" && applied && !applied.some((a) => a.startsWith("fp8"));
    parts.push(`${video.preset}${reused}${noFp8 ? ", without FP8 here" : ""}`);
  }
  return video.status === "completed" ? parts.join(" · ") : `seed ${video.seed}`;
}

function contentPath(id, variant) {
  const path = `v1/videos/${encodeURIComponent(id)}/content`;
  return variant ? `${path}?variant=${variant}` : path;
}

// With a key the files are fetched with it (a media element cannot send one) and shown from memory.
async function blobUrl(id, variant) {
  const blob = await (await call(contentPath(id, variant))).blob();
  if (!state.cards.has(id)) throw new ApiError(404, "deleted");
  const url = URL.createObjectURL(blob);
  state.blobUrls.set(id, [...(state.blobUrls.get(id) || []), url]);
  return url;
}

// A media element says only that it failed: ask the server, which says why when it has no file (it expired or
// was deleted: a 404, for which no retry can help).
async function whyNotPlayed(card, src) {
  let message = "the browser could not play it";
  let again = true;
  if (!src.startsWith("blob:")) {
    try {
      await call(src, { headers: { Range: "bytes=0-0" } });
    } catch (error) {
      if (error.status >= 400) [message, again] = [error.message, error.status !== 404];
    }
  }
  if (state.cards.has(card.dataset.id)) mediaFailed(card, message, again);
}

function mediaFailed(card, message, again = true) {
  const retry = document.createElement("button");
  retry.hidden = !again;
  retry.type = "button";
  retry.textContent = "Try again";
  retry.addEventListener("click", () => {
    delete card.dataset.media;
    card.querySelector(".media").replaceChildren();
    showMedia(card);
  });
  const note = document.createElement("p");
  note.className = "error";
  note.textContent = `the video could not be loaded: ${message}`;
  card.querySelector(".media").replaceChildren(note, retry);
  card.dataset.media = "failed"; // tried again only when asked: no download loop
}

function player(card, src, poster) {
  const video = document.createElement("video");
  video.controls = true;
  video.loop = true;
  video.playsInline = true;
  video.preload = "metadata";
  video.setAttribute("aria-label", `video: ${card.querySelector(".prompt").textContent.slice(0, 80)}`);
  if (poster) video.poster = poster;
  video.addEventListener("error", () => whyNotPlayed(card, src));
  video.src = src;
  return video;
}

function downloadLink(id, href) {
  const link = document.createElement("a");
  link.href = href;
  link.download = `${id}.mp4`;
  link.textContent = "Download MP4";
  return link;
}

// Without a key the browser streams the MP4 itself (ranges, seeking). With one, only the small thumbnail is
// fetched at once; the MP4, which may be tens of MB, when the user asks for it.
async function showMedia(card) {
  if (card.dataset.media) return;
  card.dataset.media = "loading";
  const id = card.dataset.id;
  const media = card.querySelector(".media");
  if (!state.key) {
    // `attachment`: saved, not shown, even where the answer is a redirect to a bucket (another origin, on which
    // the browser ignores the link's `download`).
    const download = downloadLink(id, `${contentPath(id)}?disposition=attachment`);
    media.replaceChildren(player(card, contentPath(id), contentPath(id, "thumbnail")), download);
    card.dataset.media = "shown";
    return;
  }
  const poster = await blobUrl(id, "thumbnail").catch(() => null); // a missing thumbnail must not hide the video
  const play = document.createElement("button");
  play.type = "button";
  play.className = "play";
  play.setAttribute("aria-label", `play video: ${card.querySelector(".prompt").textContent.slice(0, 80)}`);
  if (poster) {
    const image = document.createElement("img");
    image.src = poster;
    image.alt = "";
    play.append(image);
  }
  play.append(document.createTextNode("▶ Play"));
  play.addEventListener("click", async () => {
    play.disabled = true;
    try {
      const src = await blobUrl(id);
      const video = player(card, src, poster);
      media.replaceChildren(video, downloadLink(id, src));
      video.play().catch(() => {});
      video.focus();
    } catch (error) {
      if (state.cards.has(id)) mediaFailed(card, error.message);
    }
  });
  media.replaceChildren(play);
  card.dataset.media = "shown";
}

function newCard(video) {
  const card = $("job-card").content.firstElementChild.cloneNode(true);
  card.dataset.id = video.id;
  card.querySelector(".cancel").addEventListener("click", () => act(card, "POST", "cancel"));
  card.querySelector(".delete").addEventListener("click", () => act(card, "DELETE"));
  return card;
}

function showJob(video, first = false) {
  let card = state.cards.get(video.id);
  if (!card) {
    card = newCard(video);
    state.cards.set(video.id, card);
    if (first) $("jobs").prepend(card);
    else $("jobs").append(card);
  }
  const word = statusWord(video);
  if (card.dataset.status && card.dataset.status !== word.replace(" ", "_") && !unfinished(video)) {
    announce(`video ${word}: ${video.prompt.slice(0, 80)}`);
    state.modelsAt = 0; // the queue line under Model counts it no more: read it now, not in 10 s
  }
  card.dataset.created = video.created_at;
  card.dataset.status = word.replace(" ", "_");
  card.querySelector(".status").textContent = word;
  card.querySelector(".model").textContent = video.model;
  card.querySelector(".size").textContent = video.size;
  card.querySelector(".prompt").textContent = video.prompt;
  const label = video.prompt.slice(0, 80);
  card.querySelector(".cancel").setAttribute("aria-label", `cancel video: ${label}`);
  card.querySelector(".delete").setAttribute("aria-label", `delete video: ${label}`);
  const bar = card.querySelector("progress");
  bar.value = video.progress;
  bar.hidden = video.status !== "in_progress";
  bar.setAttribute("aria-label", `progress of: ${label}`);
  card.querySelector(".detail").textContent = detailOf(video);
  const failure = video.status === "failed" && word !== "cancelled" && video.error;
  card.querySelector(".job-error").textContent = failure ? `${video.error.code}: ${video.error.message}` : "";
  // A finished video has no Cancel: one that had the focus hands it to Delete, not to nothing.
  const cancel = card.querySelector(".cancel");
  const finished = !unfinished(video);
  if (finished && !cancel.hidden && document.activeElement === cancel) card.querySelector(".delete").focus();
  cancel.hidden = finished;
  // Asked for already: pressed again it would do nothing more, and the detail line says it is under way.
  card.dataset.cancelling = video.cancel_requested && !finished ? "true" : "";
  cancel.disabled = Boolean(card.dataset.cancelling);
  if (video.status === "completed") showMedia(card);
  $("no-jobs").hidden = true;
  return card;
}

// A card that goes while it holds the focus hands it on (to the next card's Delete, else the prompt) and says
// why, or the focus falls to the page's body and a keyboard or screen-reader user loses their place.
function forget(id, said = "", hadFocus = null, quiet = false) {
  const card = state.cards.get(id);
  if (card) {
    const focused = hadFocus ?? card.contains(document.activeElement);
    const next = card.nextElementSibling || card.previousElementSibling;
    card.remove();
    if (focused) {
      (next ? next.querySelector(".delete") : $("prompt")).focus();
      announce(said || "video no longer exists");
    } else if (said && !quiet) announce(said); // quiet: said only to whoever was on it
  }
  state.cards.delete(id);
  for (const url of state.blobUrls.get(id) || []) URL.revokeObjectURL(url);
  state.blobUrls.delete(id);
  $("no-jobs").hidden = state.cards.size > 0;
}

async function act(card, method, action) {
  const id = card.dataset.id;
  const path = `v1/videos/${encodeURIComponent(id)}${action ? `/${action}` : ""}`;
  const buttons = card.querySelectorAll(".actions button");
  const focused = document.activeElement; // a disabled button loses the focus, and a hidden one cannot take it back
  for (const button of buttons) button.disabled = true;
  card.querySelector(".action-error").textContent = "";
  try {
    const answer = await callJson(path, { method });
    state.epoch += 1;
    state.modelsAt = 0;
    if (method === "DELETE") {
      state.gone.add(id);
      forget(id, "video deleted", true);
      return;
    }
    showJob(answer);
    if (answer.cancel_requested) announce("cancel requested: the video stops after its current step");
  } catch (error) {
    // Gone on the server already (deleted elsewhere, or expired): as a delete, said, and the focus kept.
    if (error.status === 404) forget(id, "video no longer exists", card.contains(focused));
    else card.querySelector(".action-error").textContent = error.message; // kept until the next action
  } finally {
    const cancelling = Boolean(card.dataset.cancelling);
    for (const button of buttons) button.disabled = cancelling && button.classList.contains("cancel");
    if (card.isConnected && card.contains(focused) && document.activeElement === document.body) {
      [...buttons].find((button) => !button.hidden && !button.disabled)?.focus();
    }
  }
}

// The newest `limit` videos, page by page: one call reads at most MAX_PAGE.
async function listVideos(limit) {
  const data = [];
  let after = "";
  let hasMore = true;
  while (data.length < limit && hasMore) {
    const size = Math.min(limit - data.length, MAX_PAGE);
    const from = after ? `&after=${encodeURIComponent(after)}` : "";
    const page = await callJson(`v1/videos?limit=${size}&order=desc${from}`);
    data.push(...page.data);
    hasMore = page.has_more && page.data.length > 0;
    after = page.last_id;
  }
  return { data, has_more: hasMore };
}

async function refresh() {
  if (Date.now() - state.modelsAt > (state.busy ? BUSY_MODELS_EVERY_MS : MODELS_EVERY_MS)) await loadModels();
  const epoch = state.epoch;
  const list = await listVideos(state.limit);
  if (epoch !== state.epoch) return true; // changed here meanwhile: this answer is older than the page; ask again
  const videos = list.data.filter((video) => !state.gone.has(video.id));
  const seen = new Set(videos.map((video) => video.id));
  // Missing: deleted or expired; or, older than the last one listed while there are more, only moved past the
  // page by newer videos (it still exists, under Show older).
  const oldest = videos.length ? videos[videos.length - 1].created_at : Infinity;
  for (const [id, card] of [...state.cards]) {
    if (seen.has(id)) continue;
    const moved = list.has_more && Number(card.dataset.created) <= oldest;
    forget(id, moved ? "video moved under Show older" : "", null, moved);
  }
  const ol = $("jobs");
  videos.forEach((video, i) => {
    const card = showJob(video);
    if (ol.children[i] !== card) ol.insertBefore(card, ol.children[i] || null); // the server's order
  });
  const more = $("more");
  const moreHadFocus = document.activeElement === more;
  more.hidden = !list.has_more;
  if (moreHadFocus && more.hidden) {
    const last = ol.lastElementChild; // the oldest video shown: where reading had got to
    (last ? last.querySelector(".delete") : $("prompt")).focus();
  }
  $("no-jobs").hidden = state.cards.size > 0;
  return videos.some(unfinished);
}

function schedule(ms) {
  clearTimeout(state.timer);
  state.timer = setTimeout(tick, ms);
}

async function tick() {
  if (document.hidden) return; // resumed by visibilitychange
  if (state.polling) return schedule(BUSY_POLL_MS); // one refresh at a time
  state.polling = true;
  let busy = false;
  try {
    busy = await refresh();
    // The last video ended: the queue line under Model says so now, not at the idle pace (up to 10 s later).
    if (state.busy && !busy) await loadModels();
    state.busy = busy;
    showServerState("");
  } catch (error) {
    if (error.status === 401) return; // waits for a key
    showServerState(error.message, true);
  } finally {
    state.polling = false;
  }
  schedule(busy ? BUSY_POLL_MS : IDLE_POLL_MS);
}

// Start -------------------------------------------------------------------------------------------------

function start() {
  $("create").addEventListener("submit", createVideo);
  // Enter writes a new line in the prompt: Ctrl+Enter (⌘+Enter) sends the form, as in most chat and issue boxes.
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("generate").disabled) {
      event.preventDefault();
      $("create").requestSubmit();
    }
  });
  $("model").addEventListener("change", () => {
    clearFieldErrors();
    fitFormToModel();
    showModelInfo();
  });
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", () => {
    forgetKey();
    for (const id of [...state.cards.keys()]) forget(id);
    askForKey("");
  });
  $("more").addEventListener("click", () => {
    state.limit += PAGE;
    state.epoch += 1; // a refresh under way, of the shorter list, is dropped: the next one reads the longer
    schedule(0);
    $("more").focus();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) schedule(0);
  });
  schedule(0);
}

start();
