// The escape_fast demo page: a keypoint editor for the supports, and the queries' predictions.
//
// All coordinates kept here are pixels of the full-resolution image as the server decoded it
// (escape_fast.data.load_image: EXIF orientation applied). The page shows a JPEG of that decoded image
// (downscaled by the server when large) stretched to the canvas, so a canvas position converts to image
// pixels by the canvas's scale alone. The support's keypoints are sent in the simple keypoint format of
// `python -m escape_fast.predict --support-keypoints`, and "Save keypoints" writes that same file.
"use strict";

const $ = (selector) => document.querySelector(selector);
const POINT_RADIUS = 5;   // CSS pixels
const HIT_RADIUS = 6;     // a press this close to a point grabs it instead of placing a new one
const MAX_UPSCALE = 3;    // small images (the 256 px samples) are shown larger, up to this factor

const state = {
  info: null,
  names: [],        // the keypoints, shared by every support (a k-shot support annotates the same ones)
  skeleton: [],     // limbs as 0-based index pairs
  supports: [],     // {name, blob, image (the server's /api/images answer), img, points: [[x, y] | null], box}
  current: -1,      // the support shown in the editor
  selected: -1,     // the selected keypoint
  linkFrom: -1,     // first end of a limb being linked (Shift-click)
  boxMode: false,
  queries: [],      // {name, blob, image, img, box, boxMode, result, error, card, view}
  token: null,      // the server's name for the support set sent last ...
  tokenFor: null,   // ... and that set, as sent
  report: null,     // the last predictions.json
  busy: false,
  again: false,
  video: null,      // the server's /api/videos answer for the open video
  tracking: false,
};

// ------------------------------------------------------------------ helpers
class ApiError extends Error {
  constructor(message, code) { super(message); this.code = code; }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ApiError("the server does not answer: is python -m escape_fast.demo still running?", "offline");
  }
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON: reported below */ }
  if (!response.ok) {
    throw new ApiError(data && data.error ? data.error : `${response.status} ${response.statusText}`,
                       data && data.code);
  }
  return data;
}

function postJSON(path, body) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

function showMessage(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
}

function clearMessage() { $("#message").hidden = true; $("#message").textContent = ""; }

function loadImg(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiError(`cannot show ${url}`));
    img.src = url;
  });
}

// The colours of escape_fast.drawing.keypoint_colors (hue r / K), so the page and predict's PNGs agree.
function keypointColor(r, k) {
  const h = r / Math.max(k, 1), s = 0.85, v = 1.0;
  const i = Math.floor(h * 6), f = h * 6 - i;
  const p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  const rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return `rgb(${rgb.map((c) => Math.round(255 * c)).join(",")})`;
}

function round2(x) { return Math.round(x * 100) / 100; }

function stem(name) { return name.replace(/\.[^.]*$/, "") || "image"; }

function download(text, filename) {
  const url = URL.createObjectURL(new Blob([text], {type: "application/json"}));
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// An image on the server: uploaded once, decoded there; the page shows the server's display JPEG.
async function upload(blob, name) {
  const image = await api(`/api/images?name=${encodeURIComponent(name)}`,
                          {method: "POST", headers: {"Content-Type": "application/octet-stream"}, body: blob});
  const img = await loadImg(`/api/images/${image.id}`);
  return {image, img};
}

// ------------------------------------------------------------------ canvas views
// A canvas showing one image: its size on the page, and the map between canvas and image pixels.
class View {
  constructor(canvas) { this.canvas = canvas; this.sx = 1; this.sy = 1; }

  layout(entry, maxHeight) {
    const w = entry.image.width, h = entry.image.height;
    const maxWidth = this.canvas.parentElement.clientWidth || 600;
    const scale = Math.min(maxWidth / w, maxHeight / h, MAX_UPSCALE);
    const cssW = Math.max(1, Math.floor(w * scale)), cssH = Math.max(1, Math.floor(h * scale));
    const dpr = window.devicePixelRatio || 1;
    this.canvas.style.width = `${cssW}px`;
    this.canvas.style.height = `${cssH}px`;
    this.canvas.width = Math.round(cssW * dpr);
    this.canvas.height = Math.round(cssH * dpr);
    this.sx = cssW / w;
    this.sy = cssH / h;
    this.cssW = cssW;
    this.cssH = cssH;
    // read by the browser test to click at image positions
    Object.assign(this.canvas.dataset, {scaleX: this.sx, scaleY: this.sy, imageWidth: w, imageHeight: h});
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return ctx;
  }

  toImage(event) {
    const r = this.canvas.getBoundingClientRect();
    return [(event.clientX - r.left) / this.sx, (event.clientY - r.top) / this.sy];
  }

  toCanvas(p) { return [p[0] * this.sx, p[1] * this.sy]; }
}

function drawPose(ctx, view, entry, points, skeleton, labels) {
  ctx.clearRect(0, 0, view.cssW, view.cssH);
  ctx.drawImage(entry.img, 0, 0, view.cssW, view.cssH);
  const k = points.length;
  ctx.lineWidth = 2;
  for (const [a, b] of skeleton) {
    if (!points[a] || !points[b]) continue;
    const [x0, y0] = view.toCanvas(points[a]), [x1, y1] = view.toCanvas(points[b]);
    const g = ctx.createLinearGradient(x0, y0, x1, y1);
    g.addColorStop(0, keypointColor(a, k));
    g.addColorStop(1, keypointColor(b, k));
    ctx.strokeStyle = g;
    ctx.beginPath(); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
  }
  points.forEach((p, r) => {
    if (!p) return;
    const [x, y] = view.toCanvas(p);
    ctx.beginPath();
    ctx.arc(x, y, POINT_RADIUS, 0, 2 * Math.PI);
    ctx.fillStyle = keypointColor(r, k);
    ctx.fill();
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "#000";
    ctx.stroke();
    if (labels && labels[r]) {
      ctx.font = "12px system-ui, sans-serif";
      ctx.lineWidth = 3;
      ctx.strokeStyle = "#000";
      ctx.strokeText(labels[r], x + POINT_RADIUS + 2, y - POINT_RADIUS);
      ctx.fillStyle = "#fff";
      ctx.fillText(labels[r], x + POINT_RADIUS + 2, y - POINT_RADIUS);
    }
  });
}

function drawBox(ctx, view, box) {
  if (!box) return;
  const [x, y] = view.toCanvas(box), [w, h] = [box[2] * view.sx, box[3] * view.sy];
  ctx.save();
  ctx.setLineDash([6, 4]);
  ctx.lineWidth = 2;
  ctx.strokeStyle = "#fff";
  ctx.strokeRect(x, y, w, h);
  ctx.strokeStyle = "#000";
  ctx.lineDashOffset = 6;
  ctx.strokeRect(x, y, w, h);
  ctx.restore();
}

function boxFrom(a, b, entry) {
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  const x0 = clamp(Math.min(a[0], b[0]), entry.image.width), y0 = clamp(Math.min(a[1], b[1]), entry.image.height);
  const x1 = clamp(Math.max(a[0], b[0]), entry.image.width), y1 = clamp(Math.max(a[1], b[1]), entry.image.height);
  return [round2(x0), round2(y0), round2(x1 - x0), round2(y1 - y0)];
}

// ------------------------------------------------------------------ supports
const supportView = new View($("#support-canvas"));
let drag = null;

function currentSupport() { return state.supports[state.current] || null; }

function keypointFile(s) {
  // the simple format of escape_fast.data.keypoint_file.parse_keypoints; a keypoint not on this support is null
  const file = {names: [...state.names], keypoints: s.points.map((p) => (p ? [p[0], p[1]] : null)),
                skeleton: state.skeleton.map((l) => [...l])};
  if (s.box) file.box = [...s.box];
  return file;
}

function nextToPlace(s) {
  if (state.selected >= 0 && !s.points[state.selected]) return state.selected;
  return s.points.findIndex((p) => !p);
}

function addKeypoint() {
  let n = state.names.length;
  while (state.names.includes(String(n))) n += 1;
  state.names.push(String(n));
  for (const s of state.supports) s.points.push(null);
  return state.names.length - 1;
}

function removeKeypoint(i) {
  state.names.splice(i, 1);
  for (const s of state.supports) s.points.splice(i, 1);
  state.skeleton = state.skeleton.filter(([a, b]) => a !== i && b !== i).map(([a, b]) => [a - (a > i), b - (b > i)]);
  state.selected = -1;
  state.linkFrom = -1;
  supportChanged();
}

function toggleLimb(a, b) {
  const at = state.skeleton.findIndex(([p, q]) => (p === a && q === b) || (p === b && q === a));
  if (at >= 0) state.skeleton.splice(at, 1); else state.skeleton.push([a, b]);
}

function hitTest(s, event) {
  let best = -1, bestDist = HIT_RADIUS;
  const r = supportView.canvas.getBoundingClientRect();
  s.points.forEach((p, i) => {
    if (!p) return;
    const [x, y] = supportView.toCanvas(p);
    const d = Math.hypot(event.clientX - r.left - x, event.clientY - r.top - y);
    if (d <= bestDist) { best = i; bestDist = d; }
  });
  return best;
}

function clampToImage(p, s) {
  return [round2(Math.min(Math.max(p[0], 0), s.image.width)), round2(Math.min(Math.max(p[1], 0), s.image.height))];
}

function drawSupport() {
  const s = currentSupport();
  const canvas = supportView.canvas;
  canvas.hidden = !s;
  if (!s) return;
  const ctx = supportView.layout(s, window.innerHeight * 0.65);
  const labels = $("#labels").checked ? state.names : null;
  drawPose(ctx, supportView, s, s.points, state.skeleton, labels);
  drawBox(ctx, supportView, s.box);
  const mark = (i, color, radius) => {
    if (i < 0 || !s.points[i]) return;
    const [x, y] = supportView.toCanvas(s.points[i]);
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.lineWidth = 2;
    ctx.strokeStyle = color;
    ctx.stroke();
  };
  mark(state.selected, "#fff", POINT_RADIUS + 3);
  mark(state.linkFrom, "#ff0", POINT_RADIUS + 6);
}

function renderSupportPanel() {
  const tabs = $("#support-tabs");
  tabs.replaceChildren(...state.supports.map((s, i) => {
    const b = document.createElement("button");
    b.textContent = `${i + 1}: ${s.name}`;
    b.className = i === state.current ? "current" : "";
    b.addEventListener("click", () => { state.current = i; state.linkFrom = -1; renderSupportPanel(); });
    return b;
  }));
  const s = currentSupport();
  const hint = $("#support-hint");
  if (!s) {
    hint.textContent = "Add a support image, or use the sample.";
  } else if (state.boxMode) {
    hint.textContent = "Drag on the image to draw the object's box.";
  } else if (state.linkFrom >= 0) {
    hint.textContent = `Linking from '${state.names[state.linkFrom]}': Shift-click another point.`;
  } else {
    const next = nextToPlace(s);
    hint.textContent = `${s.name}, ${s.image.width} x ${s.image.height} px. Next click places: ` +
      (next >= 0 ? `'${state.names[next]}'` : "a new keypoint");
  }
  $("#box-mode").setAttribute("aria-pressed", String(state.boxMode));
  renderKeypointTable();
  drawSupport();
}

function renderKeypointTable() {
  const s = currentSupport();
  const rows = state.names.map((name, i) => {
    const tr = document.createElement("tr");
    tr.className = i === state.selected ? "selected" : "";
    const p = s ? s.points[i] : null;
    const swatch = `<span class="swatch" style="background:${keypointColor(i, state.names.length)}"></span>`;
    tr.innerHTML = `<td>${swatch}</td><td class="num">${i}</td><td><input aria-label="name of keypoint ${i}"></td>` +
      `<td class="num">${p ? p[0].toFixed(1) : "&mdash;"}</td><td class="num">${p ? p[1].toFixed(1) : "&mdash;"}</td>` +
      `<td><button class="unplace" title="not on this support">&times;</button>` +
      `<button class="delete" title="delete this keypoint from every support">delete</button></td>`;
    const input = tr.querySelector("input");
    input.value = name;
    input.addEventListener("change", () => {
      const value = input.value.trim();
      if (!value || state.names.some((n, j) => j !== i && n === value)) {
        showMessage(`A keypoint name must be non-empty and distinct; '${value}' is not.`);
        input.value = state.names[i];
        return;
      }
      state.names[i] = value;
      supportChanged();
    });
    tr.addEventListener("click", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "BUTTON") return;
      state.selected = i;
      renderSupportPanel();
    });
    tr.querySelector(".unplace").addEventListener("click", () => {
      if (s) { s.points[i] = null; state.selected = i; supportChanged(); }
    });
    tr.querySelector(".delete").addEventListener("click", () => removeKeypoint(i));
    return tr;
  });
  $("#keypoint-table tbody").replaceChildren(...rows);
  $("#skeleton").textContent = state.skeleton.length
    ? state.skeleton.map(([a, b]) => `${state.names[a]}–${state.names[b]}`).join(", ") : "none";
}

function supportChanged() {
  markStale("the support changed: press Predict");
  renderSupportPanel();
}

async function addSupport(blob, name) {
  const {image, img} = await upload(blob, name);
  state.supports.push({name: image.name, blob, image, img, points: state.names.map(() => null), box: null});
  state.current = state.supports.length - 1;
  state.selected = -1;
  supportChanged();
  return state.supports[state.current];
}

// A keypoint file read by the server (escape_fast.data.keypoint_file.parse_keypoints) into the current support.
async function loadKeypoints(text, filename) {
  const s = currentSupport();
  if (!s) throw new ApiError("Add the support image first, then load its keypoints.");
  const kp = await api(`/api/keypoints?name=${encodeURIComponent(filename)}`, {method: "POST", body: text});
  const others = state.supports.filter((t) => t !== s);
  const same = kp.names.length === state.names.length && kp.names.every((n, i) => n === state.names[i]);
  if (!same && others.some((t) => t.points.some((p) => p))) {
    throw new ApiError(`${filename}: its keypoints (${kp.names.length}: ${kp.names.slice(0, 5).join(", ")}...) ` +
      `differ from the other supports' (${state.names.length}); the supports of one prediction share their keypoints`);
  }
  if (!same) {
    state.names = kp.names;
    for (const t of others) t.points = kp.names.map(() => null);
  }
  state.skeleton = kp.skeleton;
  s.points = kp.keypoints.map((p) => (p ? [p[0], p[1]] : null));
  s.box = kp.box;
  state.selected = -1;
  supportChanged();
}

supportView.canvas.addEventListener("pointerdown", (event) => {
  const s = currentSupport();
  if (!s || event.button !== 0) return;
  supportView.canvas.focus();
  const p = supportView.toImage(event);
  if (state.boxMode) {
    drag = {kind: "box", start: p};
    supportView.canvas.setPointerCapture(event.pointerId);
    return;
  }
  const hit = event.altKey ? -1 : hitTest(s, event);
  if (event.shiftKey && hit >= 0) {
    if (state.linkFrom < 0) state.linkFrom = hit;
    else if (state.linkFrom !== hit) { toggleLimb(state.linkFrom, hit); state.linkFrom = -1; }
    supportChanged();
    return;
  }
  state.linkFrom = -1;
  if (hit >= 0) {
    state.selected = hit;
    drag = {kind: "point", index: hit};
    supportView.canvas.setPointerCapture(event.pointerId);
    renderSupportPanel();
    return;
  }
  let i = nextToPlace(s);
  if (i < 0) i = addKeypoint();
  s.points[i] = clampToImage(p, s);
  state.selected = i;
  supportChanged();
});

supportView.canvas.addEventListener("pointermove", (event) => {
  const s = currentSupport();
  if (!drag || !s) return;
  const p = supportView.toImage(event);
  if (drag.kind === "point") s.points[drag.index] = clampToImage(p, s);
  else s.box = boxFrom(drag.start, p, s);
  drawSupport();
});

supportView.canvas.addEventListener("pointerup", () => {
  const s = currentSupport();
  if (!drag || !s) return;
  if (drag.kind === "box") {
    if (s.box && (s.box[2] < 2 || s.box[3] < 2)) s.box = null;  // a click, not a box
    state.boxMode = false;
  }
  drag = null;
  supportChanged();
});

supportView.canvas.addEventListener("contextmenu", (event) => {
  const s = currentSupport();
  if (!s) return;
  event.preventDefault();
  const hit = hitTest(s, event);
  if (hit >= 0) { s.points[hit] = null; state.selected = hit; supportChanged(); }
});

supportView.canvas.addEventListener("keydown", (event) => {
  const s = currentSupport();
  if (!s || state.selected < 0 || !["Delete", "Backspace"].includes(event.key)) return;
  event.preventDefault();
  s.points[state.selected] = null;
  supportChanged();
});

// ------------------------------------------------------------------ queries
function markStale(why) {
  if (!state.report) return;
  for (const q of state.queries) if (q.card) q.card.dataset.stale = "1";
  $("#result-status").textContent = `Results shown are out of date: ${why}.`;
}

function queryCard(q) {
  const card = document.createElement("div");
  card.className = "query-card";
  card.dataset.state = "uploading";
  card.innerHTML = `<div class="card-head"><strong></strong><span class="size"></span>` +
    `<button class="box-mode" aria-pressed="false">Draw box</button><button class="clear-box">Clear box</button>` +
    `<button class="remove">Remove</button></div><p class="error" hidden></p><div class="stage"><canvas></canvas></div>` +
    `<table class="predictions" hidden><thead><tr><th></th><th>keypoint</th><th>x</th><th>y</th><th>score</th></tr>` +
    `</thead><tbody></tbody></table>`;
  card.querySelector("strong").textContent = q.name;
  q.view = new View(card.querySelector("canvas"));
  card.querySelector(".remove").addEventListener("click", () => {
    state.queries.splice(state.queries.indexOf(q), 1);
    card.remove();
    markStale("a query was removed: press Predict");  // the downloadable report still has it
  });
  card.querySelector(".box-mode").addEventListener("click", () => {
    q.boxMode = !q.boxMode;
    card.querySelector(".box-mode").setAttribute("aria-pressed", String(q.boxMode));
  });
  card.querySelector(".clear-box").addEventListener("click", () => { q.box = null; queryBoxChanged(q); });
  const canvas = q.view.canvas;
  let start = null;
  canvas.addEventListener("pointerdown", (e) => {
    if (!q.boxMode || !q.image) return;
    start = q.view.toImage(e);
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (start) { q.box = boxFrom(start, q.view.toImage(e), q); drawQuery(q); return; }
    // the nearest predicted keypoint and its score, as a tooltip
    const pts = queryPoints(q);
    const [x, y] = q.view.toImage(e);
    let best = -1, bestDist = HIT_RADIUS / q.view.sx;
    pts.forEach((p, i) => { if (p && Math.hypot(p[0] - x, p[1] - y) <= bestDist) { best = i; bestDist = Math.hypot(p[0] - x, p[1] - y); } });
    const kp = best >= 0 ? q.result.keypoints[best] : null;
    canvas.title = kp ? `${kp.name}: score ${kp.score.toFixed(3)} at (${kp.x.toFixed(1)}, ${kp.y.toFixed(1)})` : "";
  });
  canvas.addEventListener("pointerup", () => {
    if (!start) return;
    start = null;
    if (q.box && (q.box[2] < 2 || q.box[3] < 2)) q.box = null;
    q.boxMode = false;
    card.querySelector(".box-mode").setAttribute("aria-pressed", "false");
    queryBoxChanged(q);
  });
  return card;
}

function queryBoxChanged(q) {
  drawQuery(q);
  if (state.report) predict();  // keep what is shown in step with the box
}

function queryPoints(q) {
  if (!q.result || !q.result.keypoints) return [];
  return q.result.keypoints.map((p) => (p.x === null ? null : [p.x, p.y]));
}

function drawQuery(q) {
  if (!q.image) return;
  const ctx = q.view.layout(q, window.innerHeight * 0.6);
  const labels = $("#labels").checked && q.result && q.result.keypoints
    ? q.result.keypoints.map((p) => (p.x === null ? null : `${p.name} ${p.score.toFixed(2)}`)) : null;
  drawPose(ctx, q.view, q, queryPoints(q), state.report ? state.report.skeleton : [], labels);
  drawBox(ctx, q.view, q.box);
}

function renderQuery(q) {
  const card = q.card;
  const error = card.querySelector(".error");
  error.hidden = !q.error;
  error.textContent = q.error || "";
  if (q.image) {
    const shown = q.image.display_width < q.image.width
      ? ` (shown at ${q.image.display_width} x ${q.image.display_height}, predicted in full)` : "";
    card.querySelector(".size").textContent = `${q.image.width} x ${q.image.height} px${shown}`;
  }
  const table = card.querySelector("table");
  const points = q.result && q.result.keypoints;
  table.hidden = !points;
  if (points) {
    const k = points.length;
    table.querySelector("tbody").replaceChildren(...points.map((p, i) => {
      const tr = document.createElement("tr");
      const cells = p.x === null ? ["&mdash;", "&mdash;", "not in any support"]
        : [p.x.toFixed(1), p.y.toFixed(1), p.score.toFixed(3)];
      tr.innerHTML = `<td><span class="swatch" style="background:${keypointColor(i, k)}"></span></td><td></td>` +
        cells.map((c) => `<td class="num">${c}</td>`).join("");
      tr.children[1].textContent = p.name;
      return tr;
    }));
  }
  drawQuery(q);
}

async function addQuery(blob, name) {
  const q = {name, blob, image: null, img: null, box: null, boxMode: false, result: null, error: null};
  q.card = queryCard(q);
  $("#queries").appendChild(q.card);
  try {
    Object.assign(q, await upload(blob, name));
    state.queries.push(q);
    q.card.dataset.state = "ready";
    renderQuery(q);
    return q;
  } catch (e) {
    q.card.remove();
    throw e;
  }
}

// ------------------------------------------------------------------ predicting
function supportRequest() {
  return {supports: state.supports.map((s) => ({image: s.image.id, keypoints: keypointFile(s)}))};
}

async function ensureAdapted() {
  const request = supportRequest();
  const key = JSON.stringify(request);
  if (state.token && state.tokenFor === key) return;
  const answer = await postJSON("/api/adapt", {...request, model: $("#model").value, method: $("#method").value});
  state.token = answer.token;
  state.tokenFor = key;
}

// After the server dropped an image (eviction or restart), the page still has the file: send it again.
async function reupload() {
  for (const entry of [...state.supports, ...state.queries]) {
    entry.image = entry.frameOf
      ? await postJSON(`/api/videos/${entry.frameOf.video}/frames/${entry.frameOf.index}`, {})
      : (await upload(entry.blob, entry.name)).image;
  }
  state.token = null;
}

async function predict() {
  if (state.busy) { state.again = true; return; }
  clearMessage();
  if (!state.supports.length) {
    showMessage("Add a support image (or use the sample) and place its keypoints first.");
    return;
  }
  const queries = state.queries.filter((q) => q.image);
  if (!queries.length) { showMessage("Add one or more query images."); return; }
  state.busy = true;
  document.body.dataset.busy = "1";
  $("#result-status").textContent = "Predicting...";
  const started = performance.now();
  try {
    let report = null;
    for (let attempt = 0; report === null; attempt++) {
      try {
        await ensureAdapted();
        report = await postJSON("/api/predict", {
          token: state.token, model: $("#model").value, method: $("#method").value,
          queries: queries.map((q) => ({image: q.image.id, box: q.box})),
        });
      } catch (e) {
        if (attempt > 0) throw e;
        if (e.code === "unknown_support") state.token = null;
        else if (e.code === "unknown_image") await reupload();
        else throw e;
      }
    }
    state.report = report;
    queries.forEach((q, i) => {
      const r = report.queries[i];
      q.result = r.error ? null : r;
      q.error = r.error || null;
      q.card.dataset.state = r.error ? "error" : "done";
      q.card.dataset.stale = "0";
      renderQuery(q);
    });
    const failed = queries.filter((q) => q.error).length;
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const model = $("#model").value;
    $("#result-status").textContent = `${report.method} with the ${model} model, ${report.supports.length}-shot, on ` +
      `${report.device}: ${queries.length - failed} of ${queries.length} queries predicted in ${seconds} s.`;
    if (failed) showMessage(`${failed} quer${failed > 1 ? "ies" : "y"} could not be predicted; see below.`);
    $("#download").disabled = false;
  } catch (e) {
    $("#result-status").textContent = "";
    showMessage(e.message);
  } finally {
    state.busy = false;
    delete document.body.dataset.busy;
    if (state.again) { state.again = false; predict(); }
  }
}

// ------------------------------------------------------------------ videos
// The video stays on the server: a frame picked here comes back as an image to annotate, and tracking
// runs there (escape_fast.track's code), reporting its progress until the labelled video is ready.
async function openVideo(file) {
  $("#video-status").textContent = `Uploading ${file.name}...`;
  state.video = await api(`/api/videos?name=${encodeURIComponent(file.name)}`,
                          {method: "POST", headers: {"Content-Type": "application/octet-stream"}, body: file});
  const v = state.video;
  const fps = v.fps ? `, ${round2(v.fps)} fps` : "";
  $("#video-status").textContent = `${v.name}: ${v.frames} frames of ${v.width} x ${v.height}${fps}. Pick a ` +
    "frame, annotate it, then track.";
  $("#video-frame").max = Math.max(0, v.frames - 1);
  for (const id of ["#video-frame", "#annotate-frame", "#track"]) $(id).disabled = false;
  $("#track-video").hidden = true;
  $("#track-files").replaceChildren();
}

async function annotateFrame() {
  if (!state.video) throw new ApiError("Open a video first.");
  const index = Math.max(0, Math.floor(Number($("#video-frame").value) || 0));
  const image = await postJSON(`/api/videos/${state.video.id}/frames/${index}`, {});
  const img = await loadImg(`/api/images/${image.id}`);
  state.supports.push({name: image.name, blob: null, frameOf: {video: state.video.id, index}, image, img,
                       points: state.names.map(() => null), box: null});
  state.current = state.supports.length - 1;
  state.selected = -1;
  supportChanged();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function track() {
  if (state.tracking) return;
  if (!state.video) throw new ApiError("Open a video first.");
  if (!state.supports.length) throw new ApiError("Annotate a frame of the video (or add a support image) first.");
  state.tracking = true;
  $("#track").disabled = true;
  document.body.dataset.tracking = "1";
  const bar = $("#track-progress");
  try {
    await ensureAdapted();
    const {job} = await postJSON("/api/track", {token: state.token, model: $("#model").value,
                                                method: $("#method").value, video: state.video.id});
    bar.hidden = false;
    bar.removeAttribute("value");
    let status;
    for (;;) {
      status = await api(`/api/track/${job}`);
      if (status.state !== "running") break;
      if (status.total) { bar.max = status.total; bar.value = status.done; }
      $("#video-status").textContent = `${status.phase}: ${status.done}${status.total ? ` of ${status.total}` : ""} frames`;
      await sleep(400);
    }
    if (status.state === "error") throw new ApiError(status.error);
    const s = status.summary;
    $("#video-status").textContent = `${s.frames} frames tracked in ${s.seconds} s (${s.fps} frames/s), ` +
      `${round2(100 * s.low_confidence_share)}% low-confidence points (dimmed), ${s.searches} searches.`;
    const files = status.files;
    const labelled = files.find((f) => f.name.endsWith(".webm"));
    if (labelled) {
      const video = $("#track-video");
      video.src = labelled.url;
      video.hidden = false;
    }
    $("#track-files").replaceChildren(...files.map((f) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = f.url;
      a.download = f.name;
      a.textContent = f.name;
      li.appendChild(a);
      return li;
    }));
    document.body.dataset.tracked = "1";
  } finally {
    bar.hidden = true;
    state.tracking = false;
    $("#track").disabled = false;
    delete document.body.dataset.tracking;
  }
}

$("#video-file").addEventListener("change", (e) => guarded(async () => {
  const file = e.target.files[0];
  e.target.value = "";
  if (file) await openVideo(file);
}));
$("#annotate-frame").addEventListener("click", () => guarded(annotateFrame));
$("#track").addEventListener("click", () => guarded(track));

// ------------------------------------------------------------------ controls
function fillMethods() {
  const model = state.info.models.find((m) => m.name === $("#model").value);
  const previous = $("#method").value;
  $("#method").replaceChildren(...model.methods.map((m) => new Option(m, m)));
  $("#method").value = model.methods.includes(previous) ? previous : model.default_method;
}

async function guarded(action) {
  try { clearMessage(); await action(); } catch (e) { showMessage(e.message); }
}

function readText(file) { return file.text(); }

$("#support-file").addEventListener("change", (e) => guarded(async () => {
  const file = e.target.files[0];
  e.target.value = "";
  if (file) await addSupport(file, file.name);
}));

$("#keypoints-file").addEventListener("change", (e) => guarded(async () => {
  const file = e.target.files[0];
  e.target.value = "";
  if (file) await loadKeypoints(await readText(file), file.name);
}));

$("#save-keypoints").addEventListener("click", () => guarded(async () => {
  const s = currentSupport();
  if (!s) throw new ApiError("Add a support image and place its keypoints first.");
  download(JSON.stringify({image: s.name, ...keypointFile(s)}, null, 1), `${stem(s.name)}.json`);
}));

$("#box-mode").addEventListener("click", () => { state.boxMode = !state.boxMode; renderSupportPanel(); });
$("#clear-box").addEventListener("click", () => {
  const s = currentSupport();
  if (s && s.box) { s.box = null; supportChanged(); }
});
$("#remove-support").addEventListener("click", () => {
  if (state.current < 0) return;
  state.supports.splice(state.current, 1);
  state.current = Math.min(state.current, state.supports.length - 1);
  if (!state.supports.length) { state.names = []; state.skeleton = []; }
  state.selected = -1;
  supportChanged();
});

// Everything back to an empty page (the sample replaces whatever was there rather than mixing with it).
function reset() {
  for (const q of state.queries) q.card.remove();
  Object.assign(state, {names: [], skeleton: [], supports: [], current: -1, selected: -1, linkFrom: -1,
                        boxMode: false, queries: [], token: null, tokenFor: null, report: null});
  $("#download").disabled = true;
  $("#result-status").textContent = "";
  renderSupportPanel();
}

$("#use-sample").addEventListener("click", () => guarded(async () => {
  const samples = state.info && state.info.samples;
  if (!samples) throw new ApiError("This installation has no sample images.");
  reset();
  const fetchBlob = async (url) => {
    const r = await fetch(url);
    if (!r.ok) throw new ApiError(`cannot fetch ${url}: ${r.status}`);
    return r.blob();
  };
  const name = (url) => url.split("/").pop();
  await addSupport(await fetchBlob(samples.support.image), name(samples.support.image));
  const text = await (await fetchBlob(samples.support.keypoints)).text();
  await loadKeypoints(text, name(samples.support.keypoints));
  for (const url of samples.queries) await addQuery(await fetchBlob(url), name(url));
  await predict();
}));

$("#query-files").addEventListener("change", (e) => guarded(async () => {
  const files = [...e.target.files];
  e.target.value = "";
  const errors = [];
  for (const file of files) {
    try { await addQuery(file, file.name); } catch (err) { errors.push(err.message); }
  }
  if (errors.length) throw new ApiError(errors.join(" | "));
  if (state.report) await predict();
}));

$("#predict").addEventListener("click", () => predict());
$("#download").addEventListener("click", () => {
  if (state.report) download(JSON.stringify(state.report, null, 1), "predictions.json");
});
$("#model").addEventListener("change", () => { fillMethods(); if (state.report) predict(); });
$("#method").addEventListener("change", () => { if (state.report) predict(); });
$("#labels").addEventListener("change", () => { drawSupport(); state.queries.forEach(drawQuery); });
window.addEventListener("resize", () => { drawSupport(); state.queries.forEach(drawQuery); });

(async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showMessage(e.message);
    return;
  }
  $("#model").replaceChildren(...state.info.models.map((m) => new Option(m.name, m.name)));
  fillMethods();
  $("#device").textContent = `device: ${state.info.device}`;
  $("#use-sample").disabled = !state.info.samples;
  renderSupportPanel();
  document.body.dataset.ready = "1";
})();
