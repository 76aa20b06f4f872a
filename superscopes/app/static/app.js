// Superscopes page: form -> /api/run, polling /api/jobs/<id>, token badges, a Layer x Site
// table (best readout and its controls) and per-site similarity heatmaps; a run's URL
// (?run=<id>) restores it, a history list, and a second run side by side (&compare=<id>).
// A clicked table cell opens its panels (/api/cell: SAE breakdown, generated and nearest
// inputs; /api/latent: a latent as the source), kept in the URL too (&cell=<id>&latent=<id>).
// Plain DOM code, no build step. The pure helpers (no DOM) are exported at the end for Node,
// where tests/test_app.py checks them.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 400;
const HEAT_MAX = 0.6; // similarity at the top of the colour scale
const TITLE_CHAR_PX = 8.5; // generous width of a 13 px bold heatmap-title character
const ACTIVE = ["queued", "running"];
const RUN_ID = /^[0-9a-f]{12}$/; // what the server's ids look like; anything else is not sent
const CONTROL_LABELS = { alpha1: "α 1", norm: "norm-matched", random: "random dir." };
const HISTORY_SIZE = 20;

const state = {
  config: null,
  client: null, // set in init(): sessionStorage exists only in the browser
  preview: { key: "", tokens: [], numLayers: null }, // tokens of the prompt as typed
  previewSeq: 0,
  job: null, // last state from the server (without rows)
  rows: new Map(), // "position|site|layer|alpha" -> row
  controls: new Map(), // "position|site|layer|control" -> control row
  next: 0,
  controlsNext: 0,
  selected: null, // selected token position
  compare: null, // a second run shown beside: {job, rows, controls, selected}
  cancelled: null, // id of the job this page asked to cancel: a poll answered before the cancel must not undo it
  timer: null,
  panels: { cell: null, latent: null }, // the open panel jobs' last states from the server
  panelTimers: { cell: null, latent: null },
};

function clientId() {
  let id = sessionStorage.getItem("superscopes-client");
  if (!id) {
    id = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)).replace(/-/g, "");
    sessionStorage.setItem("superscopes-client", id);
  }
  return id;
}

// ------------------------------------------------------------------ server

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (error) {
    throw new Error("the server is not answering: is `superscopes app` still running?");
  }
  let data = {};
  try {
    data = await response.json();
  } catch (error) {
    if (!response.ok) throw new Error(`the server answered ${response.status} ${response.statusText}`);
  }
  if (!response.ok) {
    const failure = new Error(data.error || `the server answered ${response.status}`);
    failure.status = response.status;
    failure.job = data.job;
    throw failure;
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = "";
  const strong = document.createElement("strong");
  strong.textContent = "Error: ";
  box.append(strong, message);
  box.hidden = !message;
  if (message && box.getBoundingClientRect().top < 0) box.scrollIntoView({ block: "start", behavior: "smooth" });
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ------------------------------------------------------------------ form

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function fillForm(config) {
  const d = config.defaults;
  const models = $("model");
  for (const m of config.models) models.append(el("option", { value: m.id, text: m.label }));
  models.value = config.default_model;
  $("prompt").value = d.prompt;
  $("layers").value = d.layers;
  $("target-layer").value = String(d.target_layer);
  $("alphas").value = d.alphas;
  $("max-new-tokens").value = d.max_new_tokens;
  $("max-new-tokens").max = config.limits.max_new_tokens;
  for (const [site, label] of Object.entries(config.sites)) {
    const box = el("input", { type: "checkbox", name: "sites", value: site });
    box.checked = d.sites.includes(site);
    $("sites").append(el("label", { class: "inline" }, box, ` ${label}`));
  }
  for (const [name, label] of Object.entries(config.transforms)) {
    $("transform").append(el("option", { value: name, text: label }));
  }
  $("transform").value = d.transform;
  $("target").value = d.target;
  $("placeholder").value = d.placeholder;
  $("controls").checked = d.controls;
  const L = config.limits;
  $("limits").textContent =
    `Limits: prompt up to ${L.max_prompt_chars} characters and ${L.max_prompt_tokens} tokens; ` +
    `grid up to ${L.max_cells} cells (tokens × sites × layers × alphas); up to ${L.max_new_tokens} new tokens; ` +
    `one run at a time per page. Success: similarity above ${config.threshold}.` +
    (config.remote_configured ? "" : " NDIF models appear when NDIF_API_KEY or NDIF_HOST is set.") +
    (config.keeps_runs ? " Runs are kept on this server: each has its own URL." : "") +
    ` ${panelsLine(config.panels)}`;
  updateTargetFields();
}

function panelsLine(panels) {
  // What a clicked cell's panels can use on this server.
  const list = (items) => items.map((o) => `${o.id} (${o.model || "any model"}, ${o.site} layer ${o.layer})`).join(", ") || "none";
  return `Cell panels: SAEs ${list(panels.saes)}; generators ${list(panels.generators)}; corpora ${list(panels.corpora)}.`;
}

function targetLayerFields(value) {
  // The target-layer select and number box for a kept run's target_layer (0, "same" or n).
  if (value === "same" || value === 0) return { select: String(value), number: null };
  return { select: "number", number: String(value) };
}

function applySettings(settings) {
  // Restore the form from a kept run's settings (a permalink); fields this page lacks are skipped.
  if (!settings) return;
  const set = (id, value) => {
    if (value !== undefined && value !== null) $(id).value = value;
  };
  if ([...$("model").options].some((o) => o.value === settings.model)) $("model").value = settings.model;
  set("prompt", settings.prompt);
  const mode = document.querySelector(`input[name="tokens"][value="${settings.tokens}"]`);
  if (mode) mode.checked = true;
  set("token", settings.token);
  set("layers", settings.layers);
  const target = targetLayerFields(settings.target_layer);
  $("target-layer").value = target.select;
  if (target.number !== null) $("target-layer-number").value = target.number;
  for (const box of document.querySelectorAll('input[name="sites"]')) box.checked = settings.sites.includes(box.value);
  set("alphas", settings.alphas);
  set("transform", settings.transform);
  set("target", settings.target);
  set("template", settings.template);
  set("placeholder", settings.placeholder);
  set("max-new-tokens", settings.max_new_tokens);
  $("controls").checked = !!settings.controls;
  $("prompt-count").textContent = $("prompt").value.length;
  updateTargetFields();
}

function formBody() {
  const mode = document.querySelector('input[name="tokens"]:checked').value;
  let targetLayer = $("target-layer").value;
  if (targetLayer === "number") targetLayer = $("target-layer-number").value;
  return {
    client: state.client,
    model: $("model").value,
    prompt: $("prompt").value,
    tokens: mode,
    token: $("token").value,
    layers: $("layers").value,
    target_layer: targetLayer,
    sites: [...document.querySelectorAll('input[name="sites"]:checked')].map((b) => b.value),
    alphas: $("alphas").value,
    transform: $("transform").value,
    target: $("target").value,
    template: $("template").value,
    placeholder: $("placeholder").value,
    max_new_tokens: $("max-new-tokens").value,
    controls: $("controls").checked,
    focus: state.preview.tokens.some((t) => t.index === state.selected) ? state.selected : null,
  };
}

function updateTargetFields() {
  const kind = $("target").value;
  $("custom-target").hidden = kind !== "custom";
  $("target-layer-number").hidden = $("target-layer").value !== "number";
  const template = state.config && state.config.templates[kind];
  $("template-preview").textContent = template
    ? `“${template.text}” — the vector replaces the last “${template.placeholder}”.`
    : `The vector replaces the last “${$("placeholder").value || "x"}” of your template.`;
}

function parseLayers(text, numLayers) {
  text = text.replace(/\s+/g, "");
  if (text === "all") return numLayers;
  if (!text) return null;
  const seen = new Set();
  for (const part of text.split(",")) {
    const m = part.match(/^(\d+)(?:-(\d+))?$/);
    if (!m) return null;
    const low = +m[1], high = m[2] === undefined ? low : +m[2];
    for (let l = low; l <= high; l++) seen.add(l);
  }
  return seen.size;
}

function updateGridSize() {
  if (!state.config) return;
  const body = formBody();
  const nonSpecial = state.preview.tokens.filter((t) => !t.special).length;
  const tokens = body.tokens === "all" ? nonSpecial : 1;
  const layers = parseLayers(body.layers, state.preview.numLayers);
  const alphas = body.alphas.split(",").filter((a) => a.trim() !== "").length;
  const sites = body.sites.length;
  const cap = state.config.limits.max_cells;
  const line = $("grid-size");
  if (!layers || !state.preview.tokens.length) {
    line.textContent = "\u00a0";
    line.classList.remove("over");
    return;
  }
  const cells = tokens * sites * layers * alphas;
  const perBest = body.controls ? controlsPerBest(body.transform, body.alphas) : 0;
  const controls = tokens * sites * layers * perBest;
  line.textContent = `${tokens} token${tokens === 1 ? "" : "s"} × ${sites} sites × ${layers} layers × ${alphas} alphas = ${cells} cells` +
    (controls ? ` + ${controls} controls` : "") + ` (cap ${cap})`;
  line.classList.toggle("over", cells + controls > cap);
}

function controlsPerBest(transform, alphasText) {
  // Control cells run per best readout: alpha 1, norm-matched and random, less those the grid
  // holds already (as the server's reused_controls).
  const hasOne = alphasText.split(",").some((a) => a.trim() !== "" && Number(a) === 1);
  return 3 - (hasOne && (transform === "scale" || transform === "norm") ? 1 : 0);
}

let previewTimer = null;
function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(refreshPreview, 250);
  $("prompt-count").textContent = $("prompt").value.length;
  renderStale();
}

async function refreshPreview() {
  const model = $("model").value;
  const prompt = $("prompt").value;
  const key = `${model}\u0000${prompt}`;
  if (key === state.preview.key) return;
  const seq = ++state.previewSeq;
  const loaded = (state.config.models.find((m) => m.id === model) || {}).loaded;
  $("model-info").textContent = loaded ? "\u00a0" : "loading the model (first use)…";
  try {
    const data = await api("POST", "/api/tokens", { model, prompt });
    if (seq !== state.previewSeq) return;
    state.preview = { key, tokens: data.tokens, numLayers: data.num_layers };
    const entry = state.config.models.find((m) => m.id === model);
    if (entry) entry.loaded = true;
    $("model-info").textContent = `${data.num_layers} layers, loaded`;
    $("layers-hint").textContent = `Layers 0–${data.num_layers - 1}: a range (1-7), a list (1,3,5-7) or all. Target layer “same” writes where it read.`;
    if ($("error").dataset.source === "tokens") clearError();
  } catch (error) {
    if (seq !== state.previewSeq) return;
    state.preview = { key: "", tokens: [], numLayers: state.preview.numLayers };
    $("model-info").textContent = "\u00a0";
    showError(error.message);
    $("error").dataset.source = "tokens";
  }
  renderBadges();
  updateGridSize();
}

// ------------------------------------------------------------------ jobs

async function run(event) {
  event.preventDefault();
  clearError();
  $("run").disabled = true;
  try {
    const job = await api("POST", "/api/run", formBody());
    startJob(job);
    refreshHistory();
  } catch (error) {
    showError(error.message);
    $("error").dataset.source = "run";
    $("run").disabled = false;
    if (error.status === 409 && error.job && !state.job) resume(error.job);
  }
}

function startJob(job) {
  state.job = job;
  state.rows = new Map();
  state.controls = new Map();
  state.next = 0;
  state.controlsNext = 0;
  const positions = job.grid.positions;
  if (!positions.includes(state.selected)) state.selected = positions[positions.length - 1];
  $("all-alphas").checked = false;
  $("download").href = `/api/jobs/${job.job}/csv`;
  if (state.panels.cell && (state.panels.cell.model !== job.model || state.panels.cell.prompt !== job.prompt)) closeCell();
  updateUrl();
  absorb(job);
  poll();
}

async function resume(jobId, restoreForm = false) {
  try {
    const job = await api("GET", `/api/jobs/${jobId}?since=0`);
    if (restoreForm) applySettings(job.settings);
    startJob(job);
  } catch (error) {
    if (restoreForm) showError(error.message); // a permalink to a run this server no longer has
  }
}

function runUrl(runId, compareId, panels = {}) {
  // A run's URL, with the compared run and the open cell and latent panel jobs.
  let url = `/?run=${runId}` + (compareId ? `&compare=${compareId}` : "");
  for (const name of ["cell", "latent"]) if (panels[name] && RUN_ID.test(panels[name])) url += `&${name}=${panels[name]}`;
  return url;
}

function runsFromUrl(search) {
  // The run (and compared run, cell and latent panel jobs) a URL names; ids that are not run ids are ignored.
  const params = new URLSearchParams(search);
  const valid = (id) => (id && RUN_ID.test(id) ? id : null);
  return {
    run: valid(params.get("run")), compare: valid(params.get("compare")),
    cell: valid(params.get("cell")), latent: valid(params.get("latent")),
  };
}

function openPanels() {
  const ids = {};
  for (const name of ["cell", "latent"]) if (state.panels[name]) ids[name] = state.panels[name].job;
  return ids;
}

function updateUrl() {
  if (state.job) history.replaceState(null, "", runUrl(state.job.job, state.compare ? state.compare.job.job : null, openPanels()));
}

function addRows(view, update) {
  // Merge a poll's rows and control rows into a view ({rows, controls} maps).
  for (const row of update.rows || []) view.rows.set(`${row.position}|${row.site}|${row.layer}|${row.alpha}`, row);
  for (const c of update.controls || []) view.controls.set(`${c.position}|${c.site}|${c.layer}|${c.control}`, c);
}

function absorb(update) {
  addRows(state, update);
  state.next = update.next;
  state.controlsNext = update.controls_next || 0;
  state.job = jobState(update, state.cancelled);
  renderStatus();
  renderBadges();
  renderDetail();
  renderStale();
}

async function poll() {
  clearTimeout(state.timer);
  const job = state.job;
  if (!job) return;
  try {
    const update = await api("GET", `/api/jobs/${job.job}?since=${state.next}&controls_since=${state.controlsNext}`);
    if (!state.job || state.job.job !== job.job) return;
    absorb(update);
    if (update.status === "error") {
      showError(`the run failed: ${update.error}`);
      $("error").dataset.source = "job";
    }
    if (ACTIVE.includes(update.status)) state.timer = setTimeout(poll, POLL_MS);
    else refreshHistory();
  } catch (error) {
    showError(error.message);
    if (error.status !== 404) state.timer = setTimeout(poll, 2000);
  }
}

async function cancel() {
  if (!state.job) return;
  const jobId = state.job.job;
  state.cancelled = jobId;
  state.job.cancelling = true; // shown at once, and kept until the job stops
  renderStatus();
  try {
    await api("POST", `/api/jobs/${jobId}/cancel`, {});
    if (state.job && state.job.job === jobId) poll(); // a queued job is cancelled already: show it now
  } catch (error) {
    showError(error.message);
  }
}

async function focusToken(position) {
  // A token clicked while its run is going: the server runs its remaining cells next.
  const job = state.job;
  if (!job || !ACTIVE.includes(job.status) || !job.grid.positions.includes(position) || job.focus === position) return;
  job.focus = position;
  try {
    await api("POST", `/api/jobs/${job.job}/focus`, { position });
  } catch (error) {
    /* the run has just finished: nothing left to reorder */
  }
}

// ------------------------------------------------------------------ history and comparison

async function refreshHistory() {
  if (!state.config || !state.config.keeps_runs) return;
  try {
    const data = await api("GET", `/api/runs?limit=${HISTORY_SIZE}`);
    renderHistory(data.runs);
  } catch (error) {
    /* the list stays as it was; the next finished run refreshes it */
  }
}

function historyLine(run) {
  // One history entry's words: prompt, model, status and best similarity.
  const best = run.best === null || run.best === undefined ? "" : ` · best ${run.best.toFixed(2)}`;
  return { prompt: run.prompt, detail: `${run.model} · ${run.status} · ${run.done}/${run.total} cells${best}` };
}

function renderHistory(runs) {
  const list = $("history-list");
  list.textContent = "";
  $("history").hidden = !runs.length;
  for (const run of runs) {
    if (!RUN_ID.test(run.id)) continue;
    const words = historyLine(run);
    const link = el("a", { href: runUrl(run.id), class: "history-run", title: new Date(run.created * 1000).toLocaleString() },
      el("span", { class: "history-prompt", text: words.prompt }), el("span", { class: "hint", text: words.detail }));
    const compare = el("button", { type: "button", class: "small", text: "compare" });
    compare.addEventListener("click", () => openCompare(run.id));
    const li = el("li", {}, link, compare);
    if (state.job && state.job.job === run.id) li.classList.add("current");
    list.append(li);
  }
}

async function openCompare(runId) {
  try {
    const job = await api("GET", `/api/jobs/${runId}?since=0`);
    const view = { job: jobState(job, null), rows: new Map(), controls: new Map(), selected: null };
    addRows(view, job);
    view.selected = closestPosition(view.job.grid.positions, state.selected);
    state.compare = view;
    updateUrl();
    renderCompare();
    $("compare").scrollIntoView({ block: "nearest", behavior: "smooth" });
  } catch (error) {
    showError(error.message);
  }
}

function closestPosition(positions, wanted) {
  // The compared run's token shown first: the same position if it has one, else its last.
  return positions.includes(wanted) ? wanted : positions[positions.length - 1];
}

function closeCompare() {
  state.compare = null;
  updateUrl();
  renderCompare();
}

function renderCompare() {
  const view = state.compare;
  $("compare").hidden = !view;
  $("results").classList.toggle("comparing", !!view);
  if (!view) return;
  detailTitle($("compare-title"), view);
  const badges = $("compare-badges");
  badges.textContent = "";
  for (const t of view.job.grid.tokens) {
    const scoped = view.job.grid.positions.includes(t.index);
    const badge = el("button", { type: "button", class: "badge", "data-position": t.index });
    badge.append(el("span", { class: "tok", text: tokenLabel(t.text) }), el("sub", { text: t.index }));
    if (!scoped) badge.classList.add("unscoped");
    if (view.selected === t.index) badge.classList.add("selected");
    badge.addEventListener("click", () => {
      view.selected = t.index;
      renderCompare();
    });
    badges.append(badge);
  }
  const s = view.job.settings || {};
  $("compare-hint").textContent = `${statusText(view.job)}; layers ${s.layers}, alphas ${s.alphas}, transform ${s.transform}, target ${s.target}.`;
  fillTable($("compare-table"), view, false);
}

// ------------------------------------------------------------------ cell panels

function cellClickable(td, site, layer) {
  // A cell of the main table opens its panels: the SAE breakdown of its source vector and
  // inputs generated for it.
  const open = state.panels.cell;
  const request = open && open.request;
  if (request && open.prompt === state.job.prompt && request.position === state.selected && request.site === site && request.layer === layer) {
    td.classList.add("cell-open");
  }
  td.classList.add("clickable");
  td.tabIndex = 0;
  td.title = "click: SAE breakdown of this cell's source vector and inputs generated for it";
  const go = () => openCell(site, layer);
  td.addEventListener("click", go);
  td.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      go();
    }
  });
}

async function openCell(site, layer) {
  const job = state.job;
  if (!job) return;
  const body = { client: state.client, model: job.model, prompt: job.prompt, position: state.selected, site, layer };
  await startPanel("cell", "/api/cell", body);
  closeLatent(false);
}

async function runLatent(latent) {
  const cell = state.panels.cell;
  const sae = cell && cell.result && cell.result.sae;
  if (!sae || !sae.id) return;
  const body = { client: state.client, model: cell.model, sae: sae.id, latent, prompt: cell.prompt };
  await startPanel("latent", "/api/latent", body);
}

async function startPanel(name, path, body) {
  try {
    const job = await api("POST", path, body);
    state.panels[name] = job;
    updateUrl();
    renderPanels();
    if (name === "cell") renderDetail(); // outline the open cell
    pollPanel(name, job.job);
    $("cell").scrollIntoView({ block: "nearest", behavior: "smooth" });
  } catch (error) {
    showError(error.message);
    $("error").dataset.source = "panel";
  }
}

async function loadPanel(name, jobId) {
  // A panel job a URL names (kept or live).
  try {
    const job = await api("GET", `/api/jobs/${jobId}`);
    if (job.kind !== name) throw new Error(`run ${jobId} is not a ${name} panel job`);
    state.panels[name] = job;
    const shown = state.job;
    if (name === "cell" && shown && shown.prompt === job.prompt && shown.grid.positions.includes(job.request.position)) {
      state.selected = job.request.position; // the token whose cell it is
      renderBadges();
    }
    updateUrl();
    renderPanels();
    if (ACTIVE.includes(state.panels[name].status)) pollPanel(name, jobId);
  } catch (error) {
    showError(error.message);
  }
}

async function pollPanel(name, jobId) {
  clearTimeout(state.panelTimers[name]);
  const current = state.panels[name];
  if (!current || current.job !== jobId) return;
  if (!ACTIVE.includes(current.status)) {
    if (name === "latent") refreshExplanations();
    return;
  }
  state.panelTimers[name] = setTimeout(async () => {
    try {
      const update = await api("GET", `/api/jobs/${jobId}`);
      if (!state.panels[name] || state.panels[name].job !== jobId) return;
      state.panels[name] = update;
      renderPanels();
      pollPanel(name, jobId);
    } catch (error) {
      showError(error.message);
    }
  }, POLL_MS);
}

async function refreshExplanations() {
  // A finished latent job labels its latent in the breakdown: the server merges it in.
  const cell = state.panels.cell;
  if (!cell || ACTIVE.includes(cell.status)) return;
  try {
    const update = await api("GET", `/api/jobs/${cell.job}`);
    if (state.panels.cell && state.panels.cell.job === cell.job) {
      state.panels.cell = update;
      renderPanels();
    }
  } catch (error) {
    /* the breakdown keeps its labels */
  }
}

function closeLatent(render = true) {
  clearTimeout(state.panelTimers.latent);
  state.panels.latent = null;
  updateUrl();
  if (render) renderPanels();
}

function closeCell() {
  clearTimeout(state.panelTimers.cell);
  state.panels.cell = null;
  closeLatent(false);
  renderPanels();
  if (state.job) renderDetail();
}

function panelStatus(job) {
  // One line for a panel job: where it is in the queue, or what went wrong.
  if (job.status === "queued") return job.ahead ? `queued (${job.ahead} ahead: it runs after the chunk in progress)` : "queued";
  if (job.status === "running") return "running…";
  if (job.status === "error") return `failed: ${job.error}`;
  if (job.status === "cancelled" || job.status === "interrupted") return `${job.status}: open the cell again`;
  return "";
}

function saeHint(sae, model) {
  // What the breakdown's numbers and labels are, in words.
  if (!sae.id) return sae.why;
  return `${sae.label}: ${sae.active} latents active; the reconstruction's cosine with the vector is ` +
    `${sae.reconstruction_cosine.toFixed(2)} and its error is ${(100 * sae.error_share).toFixed(0)}% of the vector's norm. ` +
    `“Promotes”: the tokens the latent's decoder direction raises most when read through ${model}'s own final norm ` +
    "and unembedding, as if it left the last block (a logit-lens reading of the direction, not a record of where the latent fires). " +
    "“Self-explanation”: the latent patched into the identity prompt, at the alpha whose text depends most on it (relevancy); " +
    "run one with “as source”.";
}

function latentHint(result, request, prompt) {
  const scale = result.scale === "mean" ? "its mean activation when active" : "unit norm (no mean activation recorded)";
  const judged = prompt ? `similarity: the judge's, between the readout and “${prompt}”, the prompt it was read from; ` : "";
  return `Latent ${request.latent}'s decoder direction × ${scale} × α, written into the identity prompt at layer ${result.layer}. ` +
    `${judged}self-similarity: cosine between the written vector and the last layer's hidden state at that position ` +
    "(low: the model no longer carries it there); relevancy: mean change in the generated tokens' probability with the patch " +
    "against without. Green: the chosen self-explanation (highest relevancy).";
}

function num(value, digits = 2) {
  return value === null || value === undefined ? "–" : value.toFixed(digits);
}

function renderPanels() {
  const cell = state.panels.cell;
  $("cell").hidden = !cell;
  if (!cell) return;
  const r = cell.request;
  const title = $("cell-title");
  title.textContent = "";
  title.append("Cell ", el("span", { class: "tok-inline", text: tokenLabel(r.token) }),
    el("span", { class: "hint", text: ` position ${r.position}, ${state.config.sites[r.site] || r.site} layer ${r.layer} of “${cell.prompt}” (${cell.model})` }));
  $("cell-status").textContent = panelStatus(cell);
  const result = cell.result;
  const table = $("sae-table");
  table.textContent = "";
  for (const id of ["generated-list", "nearest-list"]) $(id).textContent = "";
  for (const id of ["sae-hint", "inputs-hint", "generated-why", "nearest-why"]) $(id).textContent = "";
  if (result) {
    renderBreakdown(table, result.sae, cell);
    renderInputs(result);
  }
  renderLatent();
}

function renderBreakdown(table, sae, cell) {
  $("sae-hint").textContent = saeHint(sae, cell.model);
  if (!sae.id) {
    if (sae.available && sae.available.length) {
      const list = el("ul", { class: "hint" });
      for (const a of sae.available) list.append(el("li", { text: `${a.id}: ${a.model || "any model"}, ${a.site} layer ${a.layer}, width ${a.d_in} (${a.detail})` }));
      $("sae-hint").append(list);
    }
    return;
  }
  const explanations = cell.explanations || {};
  const head = el("tr", {});
  for (const name of ["Latent", "Activation", "Promotes (unembedding of its direction)", "Self-explanation", ""]) head.append(el("th", { text: name }));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (const row of sae.latents) {
    const tokens = el("td", { class: "tokens" });
    row.promotes.forEach((t, i) => tokens.append(el("span", { text: tokenLabel(t), title: `p = ${row.promotes_probs[i].toPrecision(2)}` })));
    const known = explanations[String(row.latent)];
    const explained = el("td", { class: "out" });
    if (known) {
      explained.append(outputText(known.output), " ", el("span", { class: "hint", text: `(α ${known.alpha}, relevancy ${num(known.relevancy_mean, 4)})` }));
    } else {
      explained.append(el("span", { class: "hint", text: "not run" }));
    }
    const button = el("button", { type: "button", class: "small", "data-latent": row.latent, text: "as source" });
    button.addEventListener("click", () => runLatent(row.latent));
    body.append(el("tr", { "data-latent": row.latent }, el("td", { class: "num", text: row.latent }),
      el("td", { class: "num", text: num(row.activation, 3) }), tokens, explained, el("td", {}, button)));
  }
  table.append(body);
}

function renderInputs(result) {
  const generated = result.generated, nearest = result.nearest;
  $("inputs-hint").textContent = "Each input's distance: the standardised root-mean-square distance between its own activation " +
    "(at its last token, same site and layer) and this vector; two unrelated activations are about 1.41 apart." +
    (nearest.id ? ` Nearest inputs use ${nearest.std} per-dimension spread.` : "");
  const fill = (list, inputs) => {
    for (const input of inputs) {
      list.append(el("li", {}, el("span", { text: JSON.stringify(input.text) }),
        el("span", { class: "meta", text: `d ${num(input.distance)}` })));
    }
  };
  if (generated.id) {
    fill($("generated-list"), generated.inputs);
    $("generated-why").textContent = `${generated.id}: ${generated.detail}; seed ${generated.seed}`;
  } else {
    $("generated-why").append(`${generated.why}. Train one, then serve it:`, el("code", { class: "command", text: generated.command }));
  }
  if (nearest.id) {
    fill($("nearest-list"), nearest.inputs);
    $("nearest-why").textContent = `${nearest.id}: ${nearest.detail}`;
  } else {
    $("nearest-why").textContent = `${nearest.why}. Give one with --corpus (a pairs.pt that superscopes inverse train writes), or a generator whose folder holds one.`;
  }
}

function renderLatent() {
  const latent = state.panels.latent;
  $("latent").hidden = !latent;
  if (!latent) return;
  const r = latent.request;
  $("latent-title").textContent = `Latent ${r.latent} of ${r.sae} as the source`;
  $("latent-status").textContent = panelStatus(latent);
  const table = $("latent-table");
  table.textContent = "";
  $("latent-hint").textContent = "";
  const result = latent.result;
  if (!result) return;
  $("latent-hint").textContent = latentHint(result, r, latent.prompt);
  const head = el("tr", {});
  for (const name of ["α", "Readout", "Similarity", "Self-similarity", "Relevancy"]) head.append(el("th", { text: name }));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (const row of result.rows) {
    const out = el("td", { class: "out", text: outputText(row.output) });
    if (row.echo) out.append(" ", echoFlag());
    const tr = el("tr", { "data-alpha": row.alpha }, el("td", { class: "num", text: row.alpha }), out,
      el("td", { class: "num", text: num(row.similarity) }), el("td", { class: "num", text: num(row.self_similarity) }),
      el("td", { class: "num", text: num(row.relevancy_mean, 4) }));
    if (result.explanation && row.alpha === result.explanation.alpha) tr.classList.add("chosen");
    body.append(tr);
  }
  table.append(body);
}

// ------------------------------------------------------------------ rendering

function renderStatus() {
  const job = state.job;
  const active = !!job && ACTIVE.includes(job.status);
  $("run").disabled = active;
  $("cancel").disabled = !active || !!job.cancelling;
  const download = $("download");
  const hasRows = state.rows.size > 0;
  download.setAttribute("aria-disabled", hasRows ? "false" : "true");
  download.classList.toggle("disabled", !hasRows);
  if (!job) return;
  $("progress").max = Math.max(job.total + (job.controls_total || 0), 1);
  $("progress").value = job.done + (job.controls_done || 0);
  $("progress-text").textContent = statusText(job);
  $("status").dataset.status = job.status;
}

function statusText(job) {
  // The progress line: where a queued job stands, and a cancel as soon as it is asked for.
  if (job.status === "queued") {
    return job.cancelling ? "queued — cancelling…" : `queued (${job.ahead} ahead)`;
  }
  const words = { running: "running", done: "done", cancelled: "cancelled", error: "failed", interrupted: "interrupted by a restart" }[job.status];
  const controls = job.controls_total ? ` + ${job.controls_done} / ${job.controls_total} controls` : "";
  // The estimate: the server's measured cells per second over the cells still to run.
  const left = job.status === "running" && job.eta !== null && job.eta !== undefined ? `, about ${duration(job.eta)} left` : "";
  const kept = job.dropped ? " — too large to keep: its settings are restored, run it again for the results" : "";
  const line = `${job.done} / ${job.total} cells${controls} — ${words} (${duration(job.elapsed)}${left})${kept}`;
  return job.status === "running" && job.cancelling ? `${line} — cancelling after the chunk in progress…` : line;
}

function duration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - 60 * minutes)} s`;
}

function tokenLabel(text) {
  // Visible whitespace: leading/trailing spaces as a middle dot, newlines as ⏎.
  return text.replace(/ /g, "·").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

function tokenBest(position) {
  // The similarity of the token's best readout (bestOf: an echo only where every readout echoes).
  const best = bestOf([...state.rows.values()].filter((row) => row.position === position));
  return best && best.similarity !== null ? best.similarity : null;
}

function jobState(update, cancelled) {
  // The job without its rows and controls; a cancel this page asked for (id ``cancelled``) sticks while the
  // job is active, even against a poll that the server answered before the cancel.
  const { rows, controls, ...job } = update;
  return { ...job, cancelling: !!job.cancelling || (cancelled === job.job && ACTIVE.includes(job.status)) };
}

function isStale(job, prompt, model) {
  // The shown run no longer matches the form's prompt or model.
  return !!job && (job.prompt !== prompt || job.model !== model);
}

function badgesSource() {
  const job = state.job;
  const sameInput = !isStale(job, $("prompt").value, $("model").value);
  if (job && (sameInput || !state.preview.tokens.length)) return { tokens: job.grid.tokens, job };
  return { tokens: state.preview.tokens, job: null };
}

function renderStale() {
  // Editing the prompt (or model) dims the old run's table, and says which prompt it shows.
  const job = state.job;
  const stale = isStale(job, $("prompt").value, $("model").value);
  $("detail").classList.toggle("stale", stale);
  $("stale-note").hidden = !stale;
  $("stale-note").textContent = stale ? `These results are for “${job.prompt}” (${job.model}): run again for the edited prompt.` : "";
}

function renderBadges() {
  const box = $("badges");
  box.textContent = "";
  const { tokens, job } = badgesSource();
  if (!tokens.length) {
    box.append(el("span", { class: "hint", text: "Type a prompt to see its tokens." }));
    return;
  }
  const scoped = new Set(job ? job.grid.positions : []);
  for (const t of tokens) {
    const badge = el("button", { type: "button", class: "badge", "data-position": t.index });
    badge.append(el("span", { class: "tok", text: tokenLabel(t.text) }), el("sub", { text: t.index }));
    if (t.special) badge.classList.add("special");
    if (job && !scoped.has(t.index)) badge.classList.add("unscoped");
    if (job && state.selected === t.index) badge.classList.add("selected");
    let title = `token ${t.index}: ${JSON.stringify(t.text)}`;
    if (job && scoped.has(t.index)) {
      const best = tokenBest(t.index);
      if (best !== null) {
        const bar = el("span", { class: "bar" });
        bar.style.background = heatColor(best);
        badge.append(bar);
        title += ` — best similarity ${best.toFixed(2)}`;
        const passing = [...state.rows.values()].some((r) => r.position === t.index && passes(r, job.grid.threshold));
        if (passing) badge.classList.add("pass"); // as the table: an echo is no success
      }
    } else if (job) {
      title += " — not in this run";
    } else {
      title += " — run the grid to see its readouts";
    }
    badge.title = title;
    badge.addEventListener("click", () => {
      state.selected = t.index;
      renderBadges();
      renderDetail();
      focusToken(t.index);
    });
    box.append(badge);
  }
}

function cellRows(view, position, site, layer) {
  return view.job.grid.alphas
    .map((alpha) => view.rows.get(`${position}|${site}|${layer}|${alpha}`))
    .filter(Boolean);
}

function cellControls(controls, position, site, layer) {
  // A best readout's controls, in the recipes' order, with the labels the table shows.
  return Object.keys(CONTROL_LABELS)
    .map((name) => controls.get(`${position}|${site}|${layer}|${name}`))
    .filter(Boolean)
    .map((c) => ({ ...c, label: CONTROL_LABELS[c.control] }));
}

function passes(row, threshold) {
  // A success: above the threshold and not an echo (as the recipes count them).
  return !!row && row.similarity !== null && row.similarity > threshold && !row.echo;
}

function echoFlag() {
  return el("span", {
    class: "echo", text: "echo",
    title: "repeats the source token or the target prompt's examples: not counted as a success",
  });
}

function bestOf(rows) {
  // Highest similarity, an echo only where every row echoes; ties go to the smaller alpha
  // (the one rule of superscopes.judge.best and the server's best_rows).
  let best = null;
  for (const row of rows) {
    if (row.similarity === null) continue;
    const better = best === null || (best.echo && !row.echo) || (!best.echo === !row.echo && row.similarity > best.similarity);
    if (better) best = row;
  }
  return best || rows[0] || null;
}

function outputText(text) {
  return text === "" ? "(empty)" : text;
}

function fmt(sim) {
  return sim === null || sim === undefined ? "–" : sim.toFixed(2);
}

function detailTitle(node, view) {
  const token = view.job.grid.tokens.find((t) => t.index === view.selected);
  node.textContent = "";
  node.append(
    "Token ",
    el("span", { class: "tok-inline", text: tokenLabel(token ? token.text : "?") }),
    el("span", { class: "hint", text: ` position ${view.selected} of “${view.job.prompt}” (${view.job.model})` }),
  );
}

function fillTable(table, view, showAll) {
  // The Layer x Site table of a view ({job, rows, controls, selected}): each cell's best
  // readout with its controls, or every alpha; returns the best alphas (for the hint).
  const grid = view.job.grid;
  const finished = !ACTIVE.includes(view.job.status);
  const bestAlphas = [];
  table.textContent = "";
  const head = el("tr", {}, el("th", { text: "Layer" }));
  for (const site of grid.sites) head.append(el("th", { text: state.config.sites[site] || site }));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (const layer of grid.layers) {
    const tr = el("tr", {}, el("th", { text: layer, scope: "row" }));
    for (const site of grid.sites) {
      const rows = cellRows(view, view.selected, site, layer);
      const td = el("td", { "data-site": site, "data-layer": layer });
      const best = bestOf(rows);
      if (best && best.similarity !== null) bestAlphas.push(best.alpha);
      if (!best) {
        td.append(el("span", { class: "pending", text: finished ? "not run" : "…" }));
        td.classList.add("empty");
      } else if (showAll) {
        const list = el("ol", { class: "alphas" });
        for (const row of rows) {
          const meta = el("span", { class: "meta", text: `α ${row.alpha} · ${fmt(row.similarity)}` });
          if (row.echo) meta.append(" ", echoFlag());
          const li = el("li", {}, meta, el("span", { class: "out", text: outputText(row.output) }));
          if (row === best) li.classList.add("best");
          if (passes(row, grid.threshold)) li.classList.add("pass");
          list.append(li);
        }
        td.append(list);
      } else {
        const meta = el("div", { class: "meta", text: `α ${best.alpha} · similarity ${fmt(best.similarity)}` });
        if (best.echo) meta.append(" ", echoFlag());
        td.append(el("div", { class: "out", text: outputText(best.output) }), meta);
        const controls = cellControls(view.controls, view.selected, site, layer);
        if (controls.length) {
          const list = el("ul", { class: "controls", "aria-label": "controls" });
          for (const c of controls) {
            const label = el("span", { class: "meta", text: `${c.label}${c.control === "random" ? ` ×${c.alpha}` : ""} · ${fmt(c.similarity)}` });
            if (c.echo) label.append(" ", echoFlag());
            const li = el("li", { "data-control": c.control }, label, el("span", { class: "out", text: outputText(c.output) }));
            if (passes(c, grid.threshold)) li.classList.add("pass");
            list.append(li);
          }
          td.append(list);
        }
      }
      if (passes(best, grid.threshold)) td.classList.add("pass");
      if (view === state) cellClickable(td, site, layer);
      tr.append(td);
    }
    body.append(tr);
  }
  table.append(body);
  return bestAlphas;
}

function renderDetail() {
  const panel = $("detail");
  const job = state.job;
  if (!job || state.selected === null) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  const grid = job.grid;
  detailTitle($("detail-title"), state);
  const table = $("table");
  table.textContent = "";
  const heatmaps = $("heatmaps");
  heatmaps.textContent = "";
  $("legend").textContent = "";
  if (!grid.positions.includes(state.selected)) {
    $("detail-hint").textContent = "This token is not in the run: choose “all” source tokens or match it, then run.";
    return;
  }
  const bestAlphas = fillTable(table, state, $("all-alphas").checked);
  $("detail-hint").textContent = readoutHint(grid, bestAlphas, !!(job.settings && job.settings.controls));

  for (const site of grid.sites) heatmaps.append(heatmap(site, grid));
  $("legend").append(legend(grid.threshold));
}

function readoutHint(grid, bestAlphas, controls = false) {
  // Says "amplified" only when every best alpha amplifies (> 1).
  const where = grid.target_layer === "same" ? "the same layer" : `layer ${grid.target_layer}`;
  let what = "the text generated at the best alpha (highest similarity to the prompt; α 1 is no amplification)";
  if (bestAlphas.length && bestAlphas.every((a) => a === 1)) {
    what = "the text generated at α 1, the vector as it was read (no larger alpha scored higher)";
  } else if (bestAlphas.length && bestAlphas.every((a) => a > 1)) {
    what = "the text generated with the vector amplified by the best alpha (highest similarity to the prompt)";
  }
  const under = controls
    ? "Under it, its controls: α 1 (the vector as read), norm-matched (rescaled to the replaced vector's norm, α 1) " +
      "and a random direction with the same norm as the best readout's vector. "
    : "";
  const token = grid.target_token === undefined ? "" : ` at its token ${JSON.stringify(grid.target_token)}`;
  return `Each cell: ${what}, written into ${where} of the target prompt${token}; transform ${grid.transform}. ${under}` +
    `Green: similarity above ${grid.threshold} and not an echo (a readout that repeats the source token or the target prompt's examples).`;
}

// ------------------------------------------------------------------ heatmaps

const RAMP = [
  [0.0, [247, 251, 255]],
  [0.25, [198, 219, 239]],
  [0.5, [107, 174, 214]],
  [0.75, [33, 113, 181]],
  [1.0, [8, 48, 107]],
];

function heatColor(sim) {
  const t = Math.max(0, Math.min(1, sim / HEAT_MAX));
  for (let i = 1; i < RAMP.length; i++) {
    const [t1, c1] = RAMP[i];
    const [t0, c0] = RAMP[i - 1];
    if (t <= t1) {
      const f = (t - t0) / (t1 - t0);
      const c = c0.map((v, k) => Math.round(v + f * (c1[k] - v)));
      return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
    }
  }
  return "rgb(8, 48, 107)";
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function heatmapSize(title, nAlphas, nLayers) {
  // Wide enough for the cells and for the title (which starts at the left edge): never clipped.
  const cw = 42, ch = 24, left = 40, top = 44;
  const width = Math.max(left + cw * nAlphas + 4, Math.ceil(2 + TITLE_CHAR_PX * title.length + 8));
  return { cw, ch, left, top, width, height: top + ch * nLayers + 4 };
}

function heatmap(site, grid) {
  const title = state.config.sites[site] || site;
  const { cw, ch, left, top, width, height } = heatmapSize(title, grid.alphas.length, grid.layers.length);
  const root = svg("svg", {
    width, height, viewBox: `0 0 ${width} ${height}`, class: "heatmap", role: "img",
    "aria-label": `similarity of ${title} readouts by layer and alpha`,
  });
  root.append(svg("text", { x: 2, y: 14, class: "hm-title" }, title));
  root.append(svg("text", { x: 2, y: 36, class: "hm-axis" }, "layer"));
  grid.alphas.forEach((alpha, j) => {
    root.append(svg("text", { x: left + j * cw + cw / 2, y: 36, class: "hm-label", "text-anchor": "middle" }, `α${alpha}`));
  });
  grid.layers.forEach((layer, i) => {
    const y = top + i * ch;
    root.append(svg("text", { x: left - 6, y: y + ch / 2 + 4, class: "hm-label", "text-anchor": "end" }, layer));
    grid.alphas.forEach((alpha, j) => {
      const row = state.rows.get(`${state.selected}|${site}|${layer}|${alpha}`);
      const x = left + j * cw;
      const g = svg("g");
      const sim = row ? row.similarity : null;
      const rect = svg("rect", {
        x: x + 1, y: y + 1, width: cw - 2, height: ch - 2, rx: 3,
        fill: sim === null ? "#eef0f3" : heatColor(sim),
        class: passes(row, grid.threshold) ? "hm-cell pass" : "hm-cell", // as the table: echoes never pass
      });
      g.append(rect);
      if (row) {
        const dark = sim !== null && sim / HEAT_MAX > 0.55;
        g.append(svg("text", {
          x: x + cw / 2, y: y + ch / 2 + 4, "text-anchor": "middle", class: dark ? "hm-value light" : "hm-value",
        }, fmt(sim)));
        g.append(svg("title", {}, `layer ${layer}, α ${alpha}: similarity ${fmt(sim)}\n${outputText(row.output)}`));
      }
      root.append(g);
    });
  });
  return root;
}

function legend(threshold) {
  const width = 240, height = 34;
  const root = svg("svg", {
    width: width + 100, height, viewBox: `0 0 ${width + 100} ${height}`, class: "legend-svg", role: "img",
    "aria-label": "colour scale",
  });
  const defs = svg("defs");
  const gradient = svg("linearGradient", { id: "ramp" });
  for (const [t] of RAMP) gradient.append(svg("stop", { offset: `${t * 100}%`, "stop-color": heatColor(t * HEAT_MAX) }));
  defs.append(gradient);
  root.append(defs);
  root.append(svg("text", { x: 0, y: 15, class: "hm-label" }, "similarity"));
  root.append(svg("rect", { x: 70, y: 4, width, height: 14, fill: "url(#ramp)", stroke: "#c8ced6", rx: 2 }));
  for (const v of [0, 0.2, 0.4, 0.6]) {
    const x = 70 + (v / HEAT_MAX) * width;
    root.append(svg("text", { x, y: 31, class: "hm-label", "text-anchor": "middle" }, v === HEAT_MAX ? `≥${v}` : `${v}`));
  }
  const tx = 70 + (threshold / HEAT_MAX) * width;
  root.append(svg("line", { x1: tx, x2: tx, y1: 2, y2: 20, stroke: "#16a34a", "stroke-width": 2 }));
  return root;
}

// ------------------------------------------------------------------ start

async function init() {
  state.client = clientId();
  try {
    state.config = await api("GET", `/api/config?client=${state.client}`);
  } catch (error) {
    showError(error.message);
    return;
  }
  fillForm(state.config);
  $("form").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  $("prompt").addEventListener("input", schedulePreview);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  $("model").addEventListener("change", schedulePreview);
  $("form").addEventListener("input", updateGridSize);
  $("form").addEventListener("change", () => {
    updateTargetFields();
    updateGridSize();
  });
  $("placeholder").addEventListener("input", updateTargetFields);
  $("token").addEventListener("focus", () => {
    document.querySelector('input[name="tokens"][value="match"]').checked = true;
    updateGridSize();
  });
  $("all-alphas").addEventListener("change", renderDetail);
  $("download").addEventListener("click", (e) => {
    if ($("download").getAttribute("aria-disabled") === "true") e.preventDefault();
  });
  $("compare-close").addEventListener("click", closeCompare);
  $("cell-close").addEventListener("click", closeCell);
  const linked = runsFromUrl(location.search);
  if (linked.compare) await openCompare(linked.compare);
  if (linked.run) {
    await resume(linked.run, true);
    if (linked.cell) await loadPanel("cell", linked.cell);
    if (linked.latent) await loadPanel("latent", linked.latent);
    if (linked.cell && state.job) renderDetail(); // the open cell is outlined in the table
  } else if (state.config.active_job) resume(state.config.active_job);
  schedulePreview();
  refreshHistory();
}

if (typeof document !== "undefined") document.addEventListener("DOMContentLoaded", init);
if (typeof module !== "undefined") {
  module.exports = {
    statusText, jobState, readoutHint, heatmapSize, isStale, runsFromUrl, runUrl, cellControls, passes,
    controlsPerBest, targetLayerFields, historyLine, closestPosition, addRows, panelStatus, saeHint, latentHint,
    panelsLine, bestOf,
  };
}
