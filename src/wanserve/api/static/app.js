// The web page: a thin client of the same /v1 routes the OpenAI SDK uses (docs/api.md). Every URL is relative,
// so the page also works behind a proxy that serves wanserve under a path prefix. User text (prompts, errors)
// is only ever set as textContent, never as HTML.

const KEY_STORAGE = "wanserve.api_key";
const PAGE = 20;
const MAX_PAGE = 100; // the list route's largest `limit`
const BUSY_POLL_MS = 1000;
const IDLE_POLL_MS = 5000;
const MODELS_EVERY_MS = 10000;
const STAGES = {
  encode_prompt: "encoding the prompt",
  denoise: "denoising",
  vae_decode: "decoding frames",
  video_encode: "writing the MP4",
};
// Request fields the server may name in an error, and the form control that holds each.
const CONTROL_OF_FIELD = {
  width: "size",
  height: "size",
  seconds: "num_frames",
  image: "input_reference",
  image_url: "input_reference",
};

const $ = (id) => document.getElementById(id);

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  models: new Map(),
  limit: PAGE,
  cards: new Map(), // job id -> <li>
  blobUrls: new Map(), // job id -> object URLs made for it (only when a key is needed)
  timer: null,
  modelsAt: 0,
};

class ApiError extends Error {
  constructor(status, message, param, code, retryAfter) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new ApiError(0, `the server cannot be reached (${error.message})`);
  }
  if (response.ok) return response;
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    // not JSON: a proxy's page; the status line says enough
  }
  const message = error.message || `${response.status} ${response.statusText}`;
  const failure = new ApiError(response.status, message, error.param, error.code, response.headers.get("retry-after"));
  if (response.status === 401) askForKey(message);
  throw failure;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = state.key ? message : "";
  $("create").hidden = true;
  $("key").focus();
}

function showServerState(text, bad = false) {
  const node = $("server-state");
  node.textContent = text;
  node.classList.toggle("bad", bad);
}

// Models ------------------------------------------------------------------------------------------------

async function loadModels() {
  const body = await (await call("v1/models")).json();
  state.modelsAt = Date.now();
  const select = $("model");
  const chosen = select.value;
  state.models = new Map(body.data.map((model) => [model.id, model]));
  if (select.options.length !== state.models.size || [...select.options].some((o) => !state.models.has(o.value))) {
    select.replaceChildren(...body.data.map((model) => new Option(model.id, model.id)));
    if (state.models.has(chosen)) select.value = chosen;
    fitFormToModel();
  }
  showModelInfo();
  $("key-form").hidden = true;
  $("create").hidden = false;
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
  const takesText = model.tasks.includes("t2v") || model.tasks.includes("ti2v");
  const takesImage = model.tasks.includes("i2v") || model.tasks.includes("ti2v");
  $("image-row").hidden = !takesImage;
  $("input_reference").required = !takesText;
  $("image-hint").textContent = takesText ? "optional: the video starts from it" : "required: the video starts from it";
  if (!takesImage) $("input_reference").value = "";

  const sizes = new Set([`${d.width}x${d.height}`, ...model.sizes]);
  const auto = new Option(`default (${d.width}x${d.height}, or the image's shape)`, "");
  $("size").replaceChildren(auto, ...[...sizes].map((size) => new Option(size, size)));

  const frames = $("num_frames");
  frames.step = model.limits.frame_stride;
  frames.max = model.limits.max_frames;
  frames.placeholder = `${d.num_frames} (${d.seconds} s at ${d.fps} fps)`;
  $("num_inference_steps").placeholder = d.num_inference_steps;
  $("guidance_scale").placeholder = d.guidance_scale;
  for (const name of ["num_frames", "num_inference_steps", "guidance_scale"]) $(name).value = "";
}

// Creating a video ------------------------------------------------------------------------------------------

function clearFieldErrors() {
  for (const node of document.querySelectorAll("#create [aria-invalid]")) node.removeAttribute("aria-invalid");
  $("create-error").textContent = "";
}

function showCreateError(error) {
  let message = error.message;
  if (error.code === "queue_full" && error.retryAfter) message += ` (try again in ${error.retryAfter} s)`;
  $("create-error").textContent = message;
  const name = CONTROL_OF_FIELD[error.param] || error.param;
  const control = name && document.querySelector(`#create [name="${CSS.escape(name)}"]`);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    if (control.closest("details")) control.closest("details").open = true;
    control.focus();
  }
}

async function createVideo(event) {
  event.preventDefault();
  clearFieldErrors();
  const form = $("create");
  if (!$("prompt").value.trim()) {
    showCreateError(new ApiError(0, "prompt: write what the video should show", "prompt"));
    return;
  }
  if ($("input_reference").required && !$("input_reference").files.length) {
    showCreateError(new ApiError(0, "input_reference: this model starts from an image; choose one", "input_reference"));
    return;
  }
  // Empty inputs count as not given (the server reads them so too); the file input only when a file is chosen.
  const body = new FormData();
  for (const [name, value] of new FormData(form)) {
    if (value instanceof File ? value.size > 0 || value.name : value.trim() !== "") body.append(name, value);
  }
  const button = $("generate");
  button.disabled = true;
  try {
    const video = await (await call("v1/videos", { method: "POST", body })).json();
    showJob(video, true);
    schedule(0);
  } catch (error) {
    if (error.status !== 401) showCreateError(error);
  } finally {
    button.disabled = false;
  }
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
    return `${stage} · ${video.progress}%`;
  }
  const parts = [`${video.seconds} s`, `${video.num_frames} frames at ${video.fps} fps`, `seed ${video.seed}`];
  if (video.timings && video.timings.total != null) parts.push(`made in ${video.timings.total.toFixed(1)} s`);
  return video.status === "completed" ? parts.join(" · ") : `seed ${video.seed}`;
}

function contentPath(id, variant) {
  const path = `v1/videos/${encodeURIComponent(id)}/content`;
  return variant ? `${path}?variant=${variant}` : path;
}

// Without a key the browser streams the MP4 itself (ranges, seeking). A media element cannot send a key, so
// with one the file is fetched with the key and played from memory.
async function mediaUrl(id, variant) {
  if (!state.key) return contentPath(id, variant);
  const blob = await (await call(contentPath(id, variant))).blob();
  const url = URL.createObjectURL(blob);
  state.blobUrls.set(id, [...(state.blobUrls.get(id) || []), url]);
  return url;
}

async function showMedia(card, video) {
  if (card.dataset.media) return;
  card.dataset.media = "loading";
  const media = card.querySelector(".media");
  try {
    const player = document.createElement("video");
    player.controls = true;
    player.loop = true;
    player.playsInline = true;
    player.preload = "metadata";
    player.poster = await mediaUrl(video.id, "thumbnail");
    player.src = await mediaUrl(video.id);
    const link = document.createElement("a");
    link.href = player.src;
    link.download = `${video.id}.mp4`;
    link.textContent = "Download MP4";
    media.replaceChildren(player, link);
    card.dataset.media = "shown";
  } catch (error) {
    delete card.dataset.media; // tried again at the next refresh
    card.querySelector(".job-error").textContent = `the video could not be loaded: ${error.message}`;
  }
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
  card.dataset.status = word.replace(" ", "_");
  card.querySelector(".status").textContent = word;
  card.querySelector(".model").textContent = video.model;
  card.querySelector(".size").textContent = video.size;
  card.querySelector(".prompt").textContent = video.prompt;
  const bar = card.querySelector("progress");
  bar.value = video.progress;
  bar.hidden = !unfinished(video);
  card.querySelector(".detail").textContent = detailOf(video);
  const failure = video.status === "failed" && word !== "cancelled" && video.error;
  card.querySelector(".job-error").textContent = failure ? `${video.error.code}: ${video.error.message}` : "";
  card.querySelector(".cancel").hidden = !unfinished(video);
  if (video.status === "completed") showMedia(card, video);
  $("no-jobs").hidden = true;
  return card;
}

function forget(id) {
  const card = state.cards.get(id);
  if (card) card.remove();
  state.cards.delete(id);
  for (const url of state.blobUrls.get(id) || []) URL.revokeObjectURL(url);
  state.blobUrls.delete(id);
  $("no-jobs").hidden = state.cards.size > 0;
}

async function act(card, method, action) {
  const id = card.dataset.id;
  const path = `v1/videos/${encodeURIComponent(id)}${action ? `/${action}` : ""}`;
  for (const button of card.querySelectorAll("button")) button.disabled = true;
  try {
    const response = await call(path, { method });
    if (method === "DELETE") forget(id);
    else showJob(await response.json());
  } catch (error) {
    if (error.status === 404) forget(id);
    else card.querySelector(".job-error").textContent = error.message;
  } finally {
    for (const button of card.querySelectorAll("button")) button.disabled = false;
  }
}

async function refresh() {
  if (Date.now() - state.modelsAt > MODELS_EVERY_MS) await loadModels();
  const list = await (await call(`v1/videos?limit=${state.limit}&order=desc`)).json();
  const seen = new Set(list.data.map((video) => video.id));
  for (const id of [...state.cards.keys()]) if (!seen.has(id)) forget(id); // deleted or expired
  const ol = $("jobs");
  list.data.forEach((video, i) => {
    const card = showJob(video);
    if (ol.children[i] !== card) ol.insertBefore(card, ol.children[i] || null); // the server's order
  });
  $("more").hidden = !list.has_more || state.limit >= MAX_PAGE;
  return list.data.some(unfinished);
}

function schedule(ms) {
  clearTimeout(state.timer);
  state.timer = setTimeout(tick, ms);
}

async function tick() {
  if (document.hidden) return; // resumed by visibilitychange
  let busy = false;
  try {
    busy = await refresh();
    showServerState("");
  } catch (error) {
    if (error.status === 401) return; // waits for a key
    showServerState(error.message, true);
  }
  schedule(busy ? BUSY_POLL_MS : IDLE_POLL_MS);
}

// Start -------------------------------------------------------------------------------------------------

function start() {
  $("create").addEventListener("submit", createVideo);
  $("model").addEventListener("change", () => {
    clearFieldErrors();
    fitFormToModel();
    showModelInfo();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    localStorage.setItem(KEY_STORAGE, state.key);
    $("key").value = "";
    state.modelsAt = 0;
    schedule(0);
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    state.key = "";
    for (const id of [...state.cards.keys()]) forget(id);
    askForKey("");
  });
  $("more").addEventListener("click", () => {
    state.limit = Math.min(state.limit + PAGE, MAX_PAGE);
    schedule(0);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) schedule(0);
  });
  schedule(0);
}

start();
