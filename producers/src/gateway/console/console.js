// The coupon console: plain JavaScript, no library, nothing loaded from
// elsewhere. It calls the public HTTP API (the routes tagged `console` in
// /api/v1/openapi.json) with the admin token the person typed, and reads
// /metrics for the operators' page. Every number shown is a number one of
// those answers contains (or, for rates, the difference of two /metrics
// scrapes divided by the time between them).
"use strict";

const TOKEN_KEY = "couponAdminToken";
const OUTCOMES = ["granted", "sold_out", "rate_limited", "blacklisted", "other"];
const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
const fmt = (n) => Number(n).toLocaleString("en-US");
const timers = [];

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
  }
}

// One call to the API with the admin token; JSON answers are parsed.
async function api(method, path, body, extraHeaders = {}) {
  const headers = { ...extraHeaders, Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const type = response.headers.get("content-type") || "";
  const parsed = type.startsWith("application/json") ? await response.json() : null;
  if (response.status === 401) { signOut("The token was refused: " + ((parsed && parsed.message) || "")); }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "onclick") node.addEventListener("click", v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function numCell(value, attrs = {}) { return el("td", { class: "num", ...attrs }, fmt(value)); }

function fillBody(table, rows) {
  const body = $(table).tBodies[0];
  body.replaceChildren(...rows);
}

// ------------------------------------------------------------------ pages

function showPage() {
  const page = (location.hash || "#employees").slice(1);
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== `page-${page}`;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  while (timers.length) clearInterval(timers.pop());
  if (!token()) return;
  if (page === "employees") {
    refreshPool(); refreshBatches(); refreshBlacklist();
    timers.push(setInterval(refreshPool, REFRESH_MS));
  } else if (page === "campaigns") {
    refreshCampaigns();
    timers.push(setInterval(refreshCampaigns, REFRESH_MS));
  } else if (page === "analysts") {
    if (!$("range-until").value) setRange(3600);
    refreshAnalytics();
  } else if (page === "operators") {
    scrape();
    timers.push(setInterval(scrape, REFRESH_MS));
  }
}

function signedIn() {
  $("login").hidden = true;
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("who").textContent = "signed in (admin)";
  showPage();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  while (timers.length) clearInterval(timers.pop());
  for (const p of document.querySelectorAll(".page")) p.hidden = true;
  $("login").hidden = false;
  $("nav").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  try {
    await api("GET", "/api/v1/pool");
    $("login-error").textContent = "";
    signedIn();
  } catch (error) {
    if (error.status !== 401) signOut(`Could not check the token: ${error.message}`);
  }
});
$("signout").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", showPage);

// -------------------------------------------------------------- employees

async function refreshPool() {
  try {
    const pool = await api("GET", "/api/v1/pool");
    const row = (name, c, total) => el("tr", { class: total ? "total" : "", "data-category": name },
      el("td", {}, name),
      numCell(c.available, { "data-field": "available" }),
      numCell(c.held, { "data-field": "held" }),
      numCell(c.redeemed, { "data-field": "redeemed" }),
      numCell(c.expired, { "data-field": "expired" }),
      numCell(c.issued, { "data-field": "issued" }));
    fillBody("pool-table", [...pool.categories.map((c) => row(c.category, c, false)), row("all", pool, true)]);
    $("pool-updated").textContent = `as of ${new Date().toISOString()}`;
  } catch (error) { $("pool-updated").textContent = `not refreshed: ${error.message}`; }
}

async function refreshBatches() {
  const employee = $("batches-employee").value.trim();
  const query = new URLSearchParams({ limit: "20" });
  if (employee) query.set("employee", employee);
  try {
    const answer = await api("GET", `/api/v1/batches?${query}`);
    fillBody("batches-table", answer.batches.map((b) => el("tr", { "data-batch": b.batch_id },
      el("td", {}, b.generated_at), el("td", {}, b.employee_id), el("td", {}, b.category),
      el("td", {}, el("code", {}, b.batch_id.slice(0, 8))),
      numCell(b.projected, { "data-field": "projected" }), numCell(b.available), numCell(b.held), numCell(b.redeemed))));
    $("batches-error").textContent = "";
  } catch (error) { $("batches-error").textContent = error.message; }
}
$("batches-form").addEventListener("submit", (e) => { e.preventDefault(); refreshBatches(); });

// A release that failed (a 5xx, a timeout, the network) is sent again with
// the same Idempotency-Key while the form is unchanged: the server then
// completes and answers the first batch instead of minting a second one.
let pendingRelease = null;

function newIdempotencyKey() {
  // getRandomValues works outside secure contexts too (randomUUID does not).
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Releases `body` (a batch, or a campaign: a batch with terms) and follows
// its projection in the elements named `<prefix>-...` of its form.
async function release(prefix, body) {
  const button = $(`${prefix}-button`);
  button.disabled = true;
  $(`${prefix}-error`).textContent = "";
  if (!pendingRelease || JSON.stringify(pendingRelease.body) !== JSON.stringify(body)) {
    pendingRelease = { body, key: newIdempotencyKey() };
  }
  try {
    const batch = await api("POST", "/api/v1/coupon", body, { "Idempotency-Key": pendingRelease.key });
    pendingRelease = null;
    $(`${prefix}-status`).hidden = false;
    $(`${prefix}-batch`).textContent = batch.batch_id;
    $(`${prefix}-count-shown`).textContent = fmt(batch.count);
    $(`${prefix}-done`).textContent = "";
    await followBatch(prefix, batch.batch_id, batch.count);
  } catch (error) {
    $(`${prefix}-error`).textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

$("release-form").addEventListener("submit", (event) => {
  event.preventDefault();
  release("release", {
    id: $("release-employee").value.trim(),
    category: $("release-category").value.trim(),
    count: Number($("release-count").value),
  });
});

// Polls the batch until every coupon of it is projected (or 10 minutes).
async function followBatch(prefix, batchId, count) {
  const deadline = Date.now() + 600000;
  while (Date.now() < deadline) {
    const answer = await api("GET", `/api/v1/batches?batch_id=${encodeURIComponent(batchId)}`);
    const projected = answer.batches.length ? answer.batches[0].projected : 0;
    $(`${prefix}-projected`).textContent = fmt(projected);
    $(`${prefix}-bar`).style.width = `${Math.min(100, (100 * projected) / count)}%`;
    if (projected >= count) {
      $(`${prefix}-done`).textContent = "— done";
      $(`${prefix}-status`).dataset.done = "true";
      if (prefix === "campaign") refreshCampaigns(); else { refreshPool(); refreshBatches(); }
      return;
    }
    $(`${prefix}-status`).dataset.done = "false";
    await new Promise((r) => setTimeout(r, 400));
  }
  $(`${prefix}-error`).textContent = "the batch is not fully projected after 10 minutes";
}

async function refreshBlacklist() {
  try {
    const answer = await api("GET", "/api/v1/blacklist");
    fillBody("blacklist-table", answer.entries.map((e) => el("tr", { "data-user": e.user_id },
      el("td", {}, e.user_id), el("td", {}, e.reason || ""), el("td", {}, e.blacklisted_at || ""),
      el("td", {}, e.expires_at || "until removed"),
      el("td", {}, el("button", { class: "secondary", onclick: () => unblacklist(e.user_id) }, "Remove")))));
  } catch (error) { $("blacklist-error").textContent = error.message; }
}

async function unblacklist(user) {
  try {
    await api("DELETE", `/api/v1/blacklist?user_id=${encodeURIComponent(user)}`);
    $("blacklist-error").textContent = "";
  } catch (error) { $("blacklist-error").textContent = error.message; }
  refreshBlacklist();
}

$("blacklist-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const hours = $("blacklist-hours").value;
  const body = { user_id: $("blacklist-user").value.trim(), reason: $("blacklist-reason").value };
  if (hours) body.for_seconds = Math.max(1, Math.round(Number(hours) * 3600));
  try {
    await api("POST", "/api/v1/blacklist", body);
    $("blacklist-error").textContent = "";
    $("blacklist-user").value = "";
  } catch (error) { $("blacklist-error").textContent = error.message; }
  refreshBlacklist();
});

// -------------------------------------------------------------- campaigns

// The form's campaign: only the fields filled in are sent, so the server's
// defaults (no discount, an open window, anyone) hold for the rest; a field
// the server refuses comes back as its message.
function campaignBody() {
  const text = (id) => $(id).value.trim();
  const whole = (id) => (text(id) === "" ? undefined : Number(text(id)));
  const body = { id: text("campaign-employee"), category: text("campaign-category"), count: Number(text("campaign-count")) };
  if (text("campaign-name")) body.campaign = text("campaign-name");
  const kind = $("campaign-discount-kind").value;
  if (kind === "percent") body.discount = { percent_off: whole("campaign-discount-value") };
  if (kind === "amount") body.discount = { amount_off: whole("campaign-discount-value"), currency: text("campaign-discount-currency").toUpperCase() };
  if (text("campaign-min-amount")) body.min_order = { amount: whole("campaign-min-amount"), currency: text("campaign-min-currency").toUpperCase() };
  if (text("campaign-from")) body.valid_from = `${text("campaign-from")}Z`;
  if (text("campaign-until")) body.valid_until = `${text("campaign-until")}Z`;
  const locations = text("campaign-locations").split(",").map((l) => l.trim()).filter(Boolean);
  if (locations.length) body.locations = locations;
  if (text("campaign-min-age")) body.min_age = whole("campaign-min-age");
  return body;
}

$("campaign-form").addEventListener("submit", (event) => {
  event.preventDefault();
  release("campaign", campaignBody());
});

// Minor units, as the API has them (the page's heading says so).
const money = (m) => `${fmt(m.amount)} ${m.currency}`;

function terms(c) {
  const parts = [];
  if (c.discount && c.discount.percent_off) parts.push(`${c.discount.percent_off}% off`);
  if (c.discount && c.discount.amount_off) parts.push(`${money({ amount: c.discount.amount_off, currency: c.discount.currency })} off`);
  if (c.min_order) parts.push(`orders from ${money(c.min_order)}`);
  return parts.join("; ") || "no discount";
}

function eligibility(c) {
  const parts = [];
  if (c.locations.length) parts.push(c.locations.join(", "));
  if (c.min_age) parts.push(`${c.min_age}+`);
  return parts.join("; ") || "anyone";
}

const FUNNEL = ["claimed", "redeemed", "released", "cancelled", "expired"];
const FUNNEL_COLOR = { claimed: "granted", redeemed: "redeemed", released: "released", cancelled: "cancelled", expired: "expired" };

// One row per campaign: its claims, then what became of them side by side.
function drawCampaigns(campaigns) {
  const W = 1100, rowH = 26, L = 200;
  const H = Math.max(30, campaigns.length * rowH + 10);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "funnel per campaign" });
  const max = Math.max(1, ...campaigns.map((c) => Math.max(c.funnel.claimed, FUNNEL.slice(1).reduce((t, f) => t + c.funnel[f], 0))));
  const scale = (n) => ((W - L - 420) * n) / max;
  campaigns.forEach((c, i) => {
    const y = 5 + i * rowH;
    chart.append(svg("text", { x: 0, y: y + 15 }, (c.name || c.batch_id.slice(0, 8)).slice(0, 30)));
    chart.append(svg("rect", { x: L, y, width: scale(c.funnel.claimed), height: 9, fill: color("granted") }));
    let x = L;
    for (const step of FUNNEL.slice(1)) {
      const w = scale(c.funnel[step]);
      chart.append(svg("rect", { x, y: y + 11, width: w, height: 9, fill: color(FUNNEL_COLOR[step]) }, svg("title", {}, `${step}: ${c.funnel[step]}`)));
      x += w;
    }
    chart.append(svg("text", { x: Math.max(L + scale(c.funnel.claimed), x) + 6, y: y + 15 },
      FUNNEL.map((f) => `${f} ${fmt(c.funnel[f])}`).join(" · ")));
  });
  $("campaigns-chart").replaceChildren(chart);
}

async function refreshCampaigns() {
  try {
    const answer = await api("GET", "/api/v1/campaigns?limit=50");
    drawCampaigns(answer.campaigns);
    fillBody("campaigns-table", answer.campaigns.map((c) => el("tr", { "data-campaign": c.batch_id, "data-phase": c.phase },
      el("td", { title: `id ${c.batch_id}; created ${c.created_at}; funnel since ${c.funnel_since}` }, c.name || "", " ", el("code", {}, c.batch_id.slice(0, 8))),
      el("td", {}, c.category || "–"),
      el("td", {}, terms(c)),
      el("td", {}, `${c.valid_from || "open"} → ${c.ended_at && (!c.valid_until || c.ended_at < c.valid_until) ? `${c.ended_at} (ended by ${c.ended_by})` : c.valid_until || "open"}`),
      el("td", {}, eligibility(c)),
      el("td", { class: "phase-cell" }, el("span", { class: `phase ${c.phase}` }, c.phase),
        ...(c.phase === "ended" ? [] : [el("br"), el("button", { class: "danger", onclick: () => endCampaign(c) }, "End now")])),
      ...["issued", "available", "held"].map((f) => numCell(c.coupons[f], { "data-field": f })),
      ...FUNNEL.map((f) => numCell(c.funnel[f], { "data-field": `funnel-${f}` })))));
    $("campaigns-updated").textContent = `As of ${new Date().toISOString()}.`;
    $("campaigns-error").textContent = "";
    $("page-campaigns").dataset.loaded = String(Number($("page-campaigns").dataset.loaded || 0) + 1);
  } catch (error) { $("campaigns-error").textContent = error.message; }
}

async function endCampaign(c) {
  const what = c.name ? `"${c.name}"` : c.batch_id;
  if (!confirm(`End campaign ${what} now? Its coupons are no longer granted, and its available ones expire. Holds taken already keep their deadline.`)) return;
  try {
    await api("DELETE", `/api/v1/campaigns/${encodeURIComponent(c.batch_id)}`);
    $("campaigns-error").textContent = "";
  } catch (error) { $("campaigns-error").textContent = error.message; }
  refreshCampaigns();
}

// --------------------------------------------------------------- analysts

// datetime-local inputs hold UTC here (the labels say so).
function toInput(date) { return date.toISOString().slice(0, 19); }
function fromInput(value) { return Math.floor(Date.parse(`${value}Z`) / 1000); }

function setRange(seconds) {
  const until = new Date(Math.ceil(Date.now() / 60000) * 60000);
  $("range-until").value = toInput(until);
  $("range-since").value = toInput(new Date(until.getTime() - seconds * 1000));
}

function rangeQuery() {
  const since = fromInput($("range-since").value);
  const until = fromInput($("range-until").value);
  if (!Number.isFinite(since) || !Number.isFinite(until)) throw new Error("choose a time range");
  return new URLSearchParams({ since: String(since), until: String(until) });
}

for (const b of document.querySelectorAll("[data-range]")) {
  b.addEventListener("click", () => { setRange(Number(b.dataset.range)); refreshAnalytics(); });
}
$("range-form").addEventListener("submit", (e) => { e.preventDefault(); refreshAnalytics(); });

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const color = (name) => `var(--${name})`;

// Stacked bars: one per bucket, one layer per outcome.
function drawClaims(answer, since, until) {
  const W = 1100, H = 220, L = 44, B = 22, T = 8;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "claims per bucket by outcome" });
  const width = answer.bucket_seconds;
  const slots = Math.max(1, Math.ceil((until - since) / width));
  const max = Math.max(1, ...answer.buckets.map((b) => OUTCOMES.reduce((s, o) => s + b[o], 0)));
  const plotW = W - L - 6, plotH = H - B - T;
  for (let i = 0; i <= 4; i++) {
    const y = T + plotH - (plotH * i) / 4;
    chart.append(svg("line", { x1: L, x2: W - 6, y1: y, y2: y, stroke: "#e5e9f0" }));
    chart.append(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, fmt(Math.round((max * i) / 4))));
  }
  const barW = Math.max(1, plotW / slots - 1);
  for (const b of answer.buckets) {
    const slot = Math.floor((Date.parse(b.start) / 1000 - Math.floor(since / width) * width) / width);
    const x = L + (plotW * Math.max(0, slot)) / slots;
    let y = T + plotH;
    for (const o of OUTCOMES) {
      if (!b[o]) continue;
      const h = (plotH * b[o]) / max;
      y -= h;
      chart.append(svg("rect", { x, y, width: barW, height: h, fill: color(o) },
        svg("title", {}, `${b.start} ${o}: ${b[o]}`)));
    }
  }
  const label = (t) => new Date(t * 1000).toISOString().slice(5, 16).replace("T", " ");
  chart.append(svg("text", { x: L, y: H - 6 }, label(since)));
  chart.append(svg("text", { x: W - 6, y: H - 6, "text-anchor": "end" }, label(until)));
  $("claims-chart").replaceChildren(chart);
}

function drawFunnel(rows) {
  const W = 1100, rowH = 26, L = 160;
  const H = Math.max(30, rows.length * rowH + 10);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "redemption funnel per category" });
  const max = Math.max(1, ...rows.map((r) => Math.max(r.granted, r.redeemed + r.released + r.cancelled + r.expired)));
  rows.forEach((r, i) => {
    const y = 5 + i * rowH;
    const scale = (n) => ((W - L - 280) * n) / max;
    chart.append(svg("text", { x: 0, y: y + 15 }, r.category));
    chart.append(svg("rect", { x: L, y, width: scale(r.granted), height: 9, fill: color("granted") }));
    let x = L;
    for (const step of ["redeemed", "released", "cancelled", "expired"]) {
      chart.append(svg("rect", { x, y: y + 11, width: scale(r[step]), height: 9, fill: color(step) }, svg("title", {}, `${step}: ${r[step]}`)));
      x += scale(r[step]);
    }
    const rate = r.granted ? ` (${Math.round((100 * r.redeemed) / r.granted)}% redeemed)` : "";
    chart.append(svg("text", { x: Math.max(L + scale(r.granted), x) + 6, y: y + 15 },
      `${fmt(r.granted)} → ${fmt(r.redeemed)} / ${fmt(r.released)}; cancelled ${fmt(r.cancelled)}, expired ${fmt(r.expired)}${rate}`));
  });
  $("funnel-chart").replaceChildren(chart);
}

async function refreshAnalytics() {
  let query;
  try { query = rangeQuery(); } catch (error) { $("range-error").textContent = error.message; return; }
  const since = Number(query.get("since")), until = Number(query.get("until"));
  try {
    const [claims, funnel] = await Promise.all([
      api("GET", `/api/v1/analytics/claims?${query}`),
      api("GET", `/api/v1/analytics/funnel?${query}`),
    ]);
    $("range-error").textContent = "";
    $("bucket-label").textContent = claims.bucket_seconds === 60 ? "minute" : `${claims.bucket_seconds / 60} minutes`;
    $("claims-legend").replaceChildren(...OUTCOMES.map((o) => el("span", {}, el("i", { style: `background:${color(o)}` }), o)));
    drawClaims(claims, since, until);
    fillBody("claims-totals", OUTCOMES.map((o) => el("tr", { "data-outcome": o }, el("td", {}, o), numCell(claims.totals[o], { "data-field": "total" }))));
    drawFunnel(funnel.by_category);
    const cells = (r) => ["granted", "redeemed", "released", "cancelled", "expired"].map((f) => numCell(r[f], { "data-field": f }));
    fillBody("funnel-category", funnel.by_category.map((r) => el("tr", { "data-category": r.category }, el("td", {}, r.category), ...cells(r))));
    fillBody("funnel-batch", funnel.by_batch.map((r) => el("tr", { "data-batch": r.batch_id }, el("td", {}, r.category), el("td", {}, r.employee_id),
      el("td", {}, el("code", {}, r.batch_id.slice(0, 8))), ...cells(r))));
    $("page-analysts").dataset.loaded = `${since}-${until}`;
  } catch (error) { $("range-error").textContent = error.message; }
}

async function download(format) {
  let query;
  try { query = rangeQuery(); } catch (error) { $("range-error").textContent = error.message; return; }
  query.set("format", format);
  $("download-status").textContent = "reading the log…";
  try {
    const response = await fetch(`/api/v1/analytics/export?${query}`, { headers: { Authorization: `Bearer ${token()}` } });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new ApiError(response.status, body);
    }
    const blob = await response.blob();
    const name = `coupons-${query.get("since")}-${query.get("until")}.${format}`;
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    $("download-status").textContent = `${name}: ${fmt(blob.size)} bytes`;
  } catch (error) { $("download-status").textContent = `download failed: ${error.message}`; }
}
$("download-jsonl").addEventListener("click", () => download("jsonl"));
$("download-parquet").addEventListener("click", () => download("parquet"));

// -------------------------------------------------------------- operators

// Prometheus text format: `name{label="value",...} number`.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function sum(samples, name, filter = () => true) {
  return samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

const history = { rate: [], latency: [] };
let previous = null;
const CLAIM_ROUTE = "/api/v1/coupon";

function sparkline(points, target, unit) {
  const W = 520, H = 140, L = 40;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img" });
  const max = Math.max(1e-9, ...points.map((p) => p.v));
  chart.append(svg("text", { x: L - 4, y: 12, "text-anchor": "end" }, `${max.toFixed(max < 10 ? 1 : 0)}`));
  chart.append(svg("text", { x: L - 4, y: H - 4, "text-anchor": "end" }, "0"));
  chart.append(svg("line", { x1: L, x2: W, y1: H - 8, y2: H - 8, stroke: "#e5e9f0" }));
  if (points.length > 1) {
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    const d = points.map((p, i) => `${i ? "L" : "M"}${L + ((W - L) * (p.t - t0)) / Math.max(1, t1 - t0)},${H - 8 - ((H - 20) * p.v) / max}`).join(" ");
    chart.append(svg("path", { d, fill: "none", stroke: "var(--accent)", "stroke-width": 2 }));
  }
  chart.append(svg("text", { x: W, y: 12, "text-anchor": "end" }, unit));
  $(target).replaceChildren(chart);
}

function latencyQuantile(buckets, q) {
  // buckets: [{le, count}] cumulative, sorted; answers the bucket's bound.
  const total = buckets.length ? buckets[buckets.length - 1].count : 0;
  if (!total) return null;
  const found = buckets.find((b) => b.count >= q * total);
  return found ? found.le : null;
}

async function scrape() {
  try {
    const response = await fetch("/metrics", { headers: { Authorization: `Bearer ${token()}` } });
    if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
    const samples = parseMetrics(await response.text());
    const now = Date.now() / 1000;
    const decisions = sum(samples, "coupon_claim_decisions_total");
    const latencySum = sum(samples, "coupon_http_request_duration_seconds_sum", (l) => l.route === CLAIM_ROUTE);
    const latencyCount = sum(samples, "coupon_http_request_duration_seconds_count", (l) => l.route === CLAIM_ROUTE);
    const buckets = samples.filter((s) => s.name === "coupon_http_request_duration_seconds_bucket" && s.labels.route === CLAIM_ROUTE)
      .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value })).sort((a, b) => a.le - b.le);
    const current = { t: now, decisions, latencySum, latencyCount, buckets };
    if (previous) {
      const dt = Math.max(1e-3, now - previous.t);
      const rate = Math.max(0, decisions - previous.decisions) / dt;
      $("ops-claims-rate").textContent = rate.toFixed(1);
      history.rate.push({ t: now, v: rate });
      const dn = latencyCount - previous.latencyCount;
      if (dn > 0) {
        const mean = (1000 * (latencySum - previous.latencySum)) / dn;
        $("ops-latency-mean").textContent = `${mean.toFixed(1)} ms`;
        history.latency.push({ t: now, v: mean });
        const delta = buckets.map((b, i) => ({ le: b.le, count: b.count - ((previous.buckets[i] || {}).count || 0) }));
        const p99 = latencyQuantile(delta, 0.99);
        $("ops-latency-p99").textContent = p99 === null ? "–" : p99 === Infinity ? "> 10 s" : `≤ ${Math.round(p99 * 1000)} ms`;
      } else {
        $("ops-latency-mean").textContent = "no claims";
        $("ops-latency-p99").textContent = "no claims";
        history.latency.push({ t: now, v: 0 });
      }
      for (const h of [history.rate, history.latency]) while (h.length > 100) h.shift();
      sparkline(history.rate, "ops-rate-chart", "claims/s");
      sparkline(history.latency, "ops-latency-chart", "ms");
    }
    previous = current;
    const show = (key, value) => { for (const n of document.querySelectorAll(`[data-metric="${key}"]`)) n.textContent = fmt(value); };
    show("coupon_holds_active", sum(samples, "coupon_holds_active"));
    show("coupon_holds_overdue", sum(samples, "coupon_holds_overdue"));
    show("coupon_consumer_lag", sum(samples, "coupon_consumer_lag"));
    show("coupon_dead_letters_total", sum(samples, "coupon_dead_letters_total"));
    show("http_5xx", sum(samples, "coupon_http_requests_total", (l) => /^5/.test(l.status || "")));
    const outcomes = [...new Set(samples.filter((s) => s.name === "coupon_claim_decisions_total").map((s) => s.labels.outcome))].sort();
    fillBody("ops-decisions", outcomes.map((o) => el("tr", { "data-outcome": o }, el("td", {}, o),
      numCell(sum(samples, "coupon_claim_decisions_total", (l) => l.outcome === o), { "data-field": "decisions" }))));
    const groups = [...new Set(samples.filter((s) => s.name === "coupon_consumer_lag").map((s) => s.labels.group))].sort();
    fillBody("ops-lag", groups.map((g) => el("tr", { "data-group": g }, el("td", {}, g),
      numCell(sum(samples, "coupon_consumer_lag", (l) => l.group === g), { "data-field": "lag" }))));
    $("ops-updated").textContent = `(scraped ${new Date().toISOString()}, every ${REFRESH_MS / 1000} s)`;
    $("page-operators").dataset.scrapes = String(Number($("page-operators").dataset.scrapes || 0) + 1);
    $("ops-error").textContent = "";
  } catch (error) { $("ops-error").textContent = error.message; }
}

// ------------------------------------------------------------------ start

if (token()) signedIn(); else signOut("");
