// The Stella web console: one page, data only from the admin API with the
// bearer token typed at login (kept in sessionStorage, never a cookie).
// Text from the server goes into the page with textContent only.
"use strict";

const TOKEN_KEY = "stella.token";
const REFRESH_MS = 5000;
const PAGE_SIZE = 50;
// What each role may do (the server checks it again on every call).
const ROLE_RANK = { read: 0, operate: 1, admin: 2 };

const state = {
  role: "read",
  name: "",
  timer: null,
  confirming: false,
  fleetOffset: 0,
  fleetTotal: 0,
  auditAfter: [],
  auditNext: null,
  configAgent: "",
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Calls the admin API; an answer that is not 2xx throws ApiError with the
// server's `{"error": ...}` message.
async function api(method, path, opts) {
  const headers = { Authorization: "Bearer " + ((opts && opts.token) || token()) };
  let body;
  if (opts && opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.body);
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body, credentials: "omit", cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "the server cannot be reached (" + e.message + ")");
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (e) {
    data = null;
  }
  if (!resp.ok) {
    const message = data && typeof data.error === "string" ? data.error : resp.status + " " + resp.statusText;
    throw new ApiError(resp.status, message);
  }
  return { data, headers: resp.headers };
}

function can(role) {
  return ROLE_RANK[state.role] >= ROLE_RANK[role];
}

// ---- login ---------------------------------------------------------------

function explainLoginFailure(e) {
  if (e.status === 401) return "The token was refused: " + e.message + ". Check that you pasted the whole admin token.";
  if (e.status === 403) return "This token may not read the fleet: " + e.message;
  if (e.status === 429) return "Too many failed logins from this address: " + e.message;
  return "Cannot log in: " + e.message;
}

// Who the token belongs to. A server without scoped tokens has no whoami
// route (404): its one token is the admin's.
async function whoami(t) {
  try {
    const { data } = await api("GET", "/v1/admin/whoami", { token: t });
    return { name: data.name || "", role: ROLE_RANK[data.role] === undefined ? "read" : data.role };
  } catch (e) {
    if (e.status === 404) {
      await api("GET", "/v1/admin/fleet", { token: t });
      return { name: "admin", role: "admin" };
    }
    throw e;
  }
}

async function login(t) {
  const who = await whoami(t);
  sessionStorage.setItem(TOKEN_KEY, t);
  state.role = who.role;
  state.name = who.name;
  $("#who").textContent = (who.name ? who.name + " · " : "") + "role " + who.role;
  document.body.dataset.role = who.role;
}

function showLogin(message) {
  stopRefresh();
  sessionStorage.removeItem(TOKEN_KEY);
  for (const p of document.querySelectorAll(".page")) p.hidden = true;
  $("#nav").hidden = true;
  $("#who").hidden = true;
  $("#logout").hidden = true;
  $("#banner").hidden = true;
  $("#login").hidden = false;
  const err = $("#login-error");
  err.hidden = !message;
  err.textContent = message || "";
  $("#token").focus();
}

function showApp() {
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#who").hidden = false;
  $("#logout").hidden = false;
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/fleet";
  route();
}

// ---- routing and refresh -------------------------------------------------

function currentPage() {
  const parts = (location.hash || "#/fleet").slice(2).split("/");
  return { page: parts[0] || "fleet", arg: parts.slice(1).map(decodeURIComponent).join("/") };
}

const PAGES = {
  fleet: loadFleet,
  agent: loadAgent,
  rollouts: loadRollouts,
  releases: loadReleases,
  config: loadConfig,
  audit: loadAudit,
};

function route() {
  if (!token()) return showLogin("");
  const { page } = currentPage();
  const name = PAGES[page] ? page : "fleet";
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-" + name;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("current", a.dataset.page === name || (name === "agent" && a.dataset.page === "fleet"));
  }
  refresh();
}

async function refresh() {
  stopRefresh();
  if (!token()) return;
  const { page, arg } = currentPage();
  const load = PAGES[page] || loadFleet;
  try {
    await load(arg);
    $("#banner").hidden = true;
    $("#refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e.status === 401) return showLogin("The token is no longer accepted: " + e.message);
    const banner = $("#banner");
    banner.textContent = e.message;
    banner.hidden = false;
  }
  if (token()) state.timer = setTimeout(refresh, REFRESH_MS);
}

function stopRefresh() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

// ---- confirmation --------------------------------------------------------

function confirmAction(text) {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  state.confirming = true;
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        state.confirming = false;
        resolve(dialog.returnValue === "yes");
      },
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    $("#confirm-no").focus();
  });
}

async function act(what, method, path) {
  if (!(await confirmAction(what))) return;
  try {
    await api(method, path);
  } catch (e) {
    const banner = $("#banner");
    banner.textContent = "Not done: " + e.message;
    banner.hidden = false;
    return;
  }
  refresh();
}

// ---- helpers for tables --------------------------------------------------

function labelsText(labels) {
  return Object.entries(labels || {})
    .map(([k, v]) => k + "=" + v)
    .join(", ");
}

function statusBadge(status, reason) {
  return el("span", { class: "badge " + status, text: reason ? status + " (" + reason + ")" : status });
}

function fieldRows(table, rows) {
  clear(table);
  for (const [k, v, cls] of rows) {
    const cell = el("td", { class: cls || "" });
    cell.append(v === null || v === undefined || v === "" ? "–" : v);
    table.append(el("tr", {}, el("th", { text: k }), cell));
  }
}

function countTable(table, counts) {
  clear(table);
  const entries = Object.entries(counts || {}).sort((a, b) => b[1] - a[1]);
  if (!entries.length) table.append(el("tr", {}, el("td", { class: "muted", text: "none" })));
  for (const [k, n] of entries) table.append(el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: n })));
}

function ago(rfc3339) {
  if (!rfc3339) return "never";
  const s = Math.round((Date.now() - Date.parse(rfc3339)) / 1000);
  if (isNaN(s)) return rfc3339;
  if (s < 60) return Math.max(s, 0) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

// ---- fleet ---------------------------------------------------------------

function fleetQuery() {
  const q = new URLSearchParams();
  for (const name of ["status", "label", "version", "name"]) {
    const v = $("#filter-" + name).value.trim();
    if (v) q.set(name, v);
  }
  q.set("limit", String(PAGE_SIZE));
  q.set("offset", String(state.fleetOffset));
  return q.toString();
}

async function loadFleet() {
  const [summary, page] = await Promise.all([
    api("GET", "/v1/admin/fleet"),
    api("GET", "/v1/admin/agents?" + fleetQuery()),
  ]);
  const s = summary.data;
  const cards = clear($("#fleet-counts"));
  cards.append(el("div", { class: "card" }, el("span", { class: "n", id: "count-total", text: s.agents }), "agents"));
  for (const status of ["active", "inactive", "revoked"]) {
    cards.append(
      el(
        "div",
        { class: "card " + status },
        el("span", { class: "n", id: "count-" + status, text: (s.status || {})[status] || 0 }),
        status,
      ),
    );
  }
  for (const [reason, n] of Object.entries(s.reasons || {})) {
    cards.append(el("div", { class: "card inactive" }, el("span", { class: "n", text: n }), reason.replace("_", " ")));
  }
  countTable($("#fleet-versions"), s.versions);
  countTable($("#fleet-targets"), s.targets);

  state.fleetTotal = Number(page.headers.get("x-total-count") || page.data.length);
  const tbody = clear($("#agents-table tbody"));
  for (const a of page.data) {
    const link = el("a", { href: "#/agent/" + encodeURIComponent(a.id), text: a.name || a.id });
    tbody.append(
      el(
        "tr",
        { "data-id": a.id, "data-status": a.status },
        el("td", {}, link),
        el("td", {}, statusBadge(a.status, a.reason)),
        el("td", { text: a.version }),
        el("td", { text: a.target }),
        el("td", { text: labelsText(a.labels) }),
        el("td", { text: ago(a.last_heartbeat), title: a.last_heartbeat || "" }),
        el("td", { class: "mono", text: a.id }),
      ),
    );
  }
  if (!page.data.length) {
    tbody.append(el("tr", {}, el("td", { colSpan: 7, class: "muted", text: "No agent matches." })));
  }
  const first = page.data.length ? state.fleetOffset + 1 : 0;
  $("#page-info").textContent = first + "–" + (state.fleetOffset + page.data.length) + " of " + state.fleetTotal;
  $("#page-prev").disabled = state.fleetOffset === 0;
  $("#page-next").disabled = state.fleetOffset + PAGE_SIZE >= state.fleetTotal;
}

// ---- one agent -----------------------------------------------------------

async function loadAgent(id) {
  const path = "/v1/admin/agents/" + encodeURIComponent(id);
  const [agent, config, drift, doctor] = await Promise.all([
    api("GET", path),
    api("GET", "/v1/admin/config?agent=" + encodeURIComponent(id)).catch(() => null),
    api("GET", "/v1/admin/drift").catch(() => null),
    api("GET", path + "/doctor").catch(() => null),
  ]);
  const a = agent.data;
  $("#agent-title").textContent = a.name || a.id;
  const expires = Date.parse(a.cert_not_after);
  const days = isNaN(expires) ? "" : " (in " + Math.round((expires - Date.now()) / 86400000) + " d)";
  fieldRows($("#agent-fields"), [
    ["Id", a.id, "mono"],
    ["Status", statusBadge(a.status, a.reason)],
    ["Version", a.version],
    ["Target", a.target],
    ["Platform", a.platform ? a.platform.os + "/" + a.platform.arch : ""],
    ["Labels", labelsText(a.labels)],
    ["Capabilities", (a.capabilities || []).join(", ")],
    ["Enrolled", a.enrolled_at],
    ["Last heartbeat", a.last_heartbeat ? a.last_heartbeat + " (" + ago(a.last_heartbeat) + ")" : "never"],
    ["Heartbeats", String(a.heartbeat_seq)],
    ["Uptime", a.uptime_s + " s"],
    ["Certificate", "serial " + a.cert_serial],
    ["Certificate expires", a.cert_not_after + days],
  ]);
  $("#agent-fields").dataset.status = a.status;

  const row = drift && (drift.data || []).find((r) => r.agent === a.id);
  const desired = config ? config.data.hash : "";
  let driftText = "none: runs its desired config";
  if (row) {
    driftText = [
      row.applied_hash !== row.desired_hash ? "applied differs from desired" : "",
      row.local_drift ? "the file on the host was edited" : "",
      row.since ? "since " + row.since : "",
    ]
      .filter(Boolean)
      .join("; ");
  }
  fieldRows($("#agent-config"), [
    ["Desired", desired, "mono"],
    ["Applied", a.config_hash || "none yet", "mono"],
    ["Drift", driftText, row ? "warn" : ""],
    ["Refused", a.config_error || ""],
  ]);

  const d = a.doctor || {};
  const box = clear($("#agent-doctor"));
  box.append(
    el(
      "p",
      {},
      el("span", { class: "badge active", text: (d.pass || 0) + " pass" }),
      " ",
      el("span", { class: "badge inactive", text: (d.warn || 0) + " warn" }),
      " ",
      el("span", { class: "badge revoked", text: (d.fail || 0) + " fail" }),
      " ",
      el("span", { class: "badge", text: (d.skip || 0) + " skip" }),
    ),
  );
  const report = doctor && doctor.data && doctor.data.report;
  if (report) {
    const bad = report.checks.filter((c) => c.status === "fail" || c.status === "warn");
    const list = el("ul", { class: "checks" });
    for (const c of bad) list.append(el("li", { class: c.status }, el("b", { text: c.id }), " " + c.code + ": " + c.message));
    box.append(el("p", { class: "muted", text: "Report received " + doctor.data.received_at }));
    if (bad.length) box.append(list);
  } else if ((d.failing || []).length) {
    box.append(el("p", { text: "Failing: " + d.failing.join(", ") }));
  }

  const u = a.update || {};
  const f = a.last_failure;
  let progress = "";
  if (u.state === "downloading" && u.total) progress = Math.floor((100 * (u.bytes || 0)) / u.total) + "% of " + u.total.toLocaleString() + " bytes";
  let failure = u.error || "";
  if (f) {
    failure = el("div", {}, f.phase + " updating to " + f.version + ": " + f.reason + " (" + f.received_at + ")");
    if ((f.lines || []).length) failure.append(el("pre", { class: "log", text: f.lines.join("\n") }));
  }
  fieldRows($("#agent-update"), [
    ["State", u.state],
    ["Version", u.version],
    ["Progress", progress],
    ["Last failure", failure],
  ]);

  const actions = clear($("#agent-actions"));
  const button = (label, action, role, cls, text) => {
    if (!can(role)) return;
    const b = el("button", { type: "button", class: cls || "", "data-action": action, text: label });
    b.addEventListener("click", () => act(text, "POST", path + "/" + action));
    actions.append(b);
  };
  const who = (a.name || "") + " (" + a.id + ")";
  if (a.status !== "revoked") {
    if (a.status === "inactive" && a.reason === "deactivated") {
      button("Activate", "activate", "operate", "", "Activate " + who + "? It may heartbeat again.");
    } else {
      button("Deactivate", "deactivate", "operate", "", "Deactivate " + who + "? Its heartbeats will be refused until it is activated.");
    }
    button("Renew certificate", "renew", "operate", "", "Ask " + who + " to renew its certificate at its next heartbeat?");
    button("Revoke", "revoke", "admin", "danger", "Revoke " + who + "? This cannot be undone: the host must enroll again.");
  }
}

// ---- rollouts and releases ------------------------------------------------

async function loadRollouts() {
  const { data } = await api("GET", "/v1/admin/rollouts");
  const box = clear($("#rollouts"));
  if (!data.length) box.append(el("p", { class: "muted", text: "No rollouts." }));
  for (const r of data) {
    const head = el(
      "h2",
      {},
      "Release " + r.release + " ",
      el("span", { class: "badge " + r.status, text: r.reason ? r.status + " (" + r.reason + ")" : r.status }),
    );
    const meta = el("p", {
      class: "muted",
      text:
        r.id + " · started " + r.created_at + " · soak " + r.soak + " · max failures " + r.max_failures +
        " · selector " + (labelsText(r.selector) || "all") +
        (r.agent_timeout ? " · agent timeout " + r.agent_timeout : "") +
        (r.window ? " · window " + r.window + " UTC" + (r.days ? " " + r.days : "") + (r.window_open === false ? " (closed now)" : " (open now)") : ""),
    });
    const table = el(
      "table",
      { class: "stages" },
      el("tr", {}, ...["Stage", "State", "Agents", "Updated", "Failed", "Progress", "Phases"].map((h) => el("th", { text: h }))),
    );
    for (const s of r.stages) {
      table.append(
        el(
          "tr",
          {},
          el("td", { text: s.stage }),
          el("td", { text: s.state }),
          el("td", { class: "num", text: s.agents }),
          el("td", { class: "num", text: s.updated }),
          el("td", { class: "num", text: s.failed }),
          el("td", {}, el("progress", { max: Math.max(s.agents, 1), value: s.updated })),
          el("td", {
            class: "small",
            text: Object.entries(s.phases || {})
              .filter(([, n]) => n > 0)
              .map(([p, n]) => p + " " + n)
              .join(", "),
          }),
        ),
      );
    }
    const actions = el("div", { class: "actions" });
    const add = (label, action, ok, cls) => {
      if (!ok || !can("operate")) return;
      const b = el("button", { type: "button", class: cls || "", "data-action": action, text: label });
      b.addEventListener("click", () =>
        act(label + " the rollout of " + r.release + " (" + r.id + ")?", "POST", "/v1/admin/rollouts/" + encodeURIComponent(r.id) + "/" + action),
      );
      actions.append(b);
    };
    const live = r.status === "running" || r.status === "paused";
    add("Pause", "pause", r.status === "running");
    add("Resume", "resume", r.status === "paused");
    add("Abort", "abort", live, "danger");
    box.append(el("div", { class: "rollout", "data-id": r.id }, head, meta, table, actions));
  }
}

async function loadReleases() {
  const { data } = await api("GET", "/v1/admin/releases");
  const box = clear($("#releases"));
  if (!data.length) box.append(el("p", { class: "muted", text: "No releases imported (stella-server release import DIR)." }));
  for (const r of data) {
    const table = el("table", {}, el("tr", {}, el("th", { text: "File" }), el("th", { text: "Size" }), el("th", { text: "sha256" })));
    for (const f of r.files) {
      table.append(el("tr", {}, el("td", { text: f.name }), el("td", { class: "num", text: f.size.toLocaleString() }), el("td", { class: "mono", text: f.sha256 })));
    }
    box.append(el("div", { class: "release" }, el("h2", { text: r.version }), el("p", { class: "muted", text: "imported " + r.imported_at }), table));
  }
}

// ---- config --------------------------------------------------------------

async function loadConfig() {
  const [all, shown] = await Promise.all([
    api("GET", "/v1/admin/config"),
    state.configAgent ? api("GET", "/v1/admin/config?agent=" + encodeURIComponent(state.configAgent)) : null,
  ]);
  const table = clear($("#config-scopes"));
  table.append(el("tr", {}, ...["Scope", "Version", "Updated", "Hash"].map((h) => el("th", { text: h }))));
  for (const s of all.data.scopes) {
    table.append(el("tr", {}, el("td", { text: s.scope }), el("td", { class: "num", text: s.version }), el("td", { text: s.updated_at }), el("td", { class: "mono", text: s.hash })));
  }
  if (!all.data.scopes.length) table.append(el("tr", {}, el("td", { colSpan: 4, class: "muted", text: "No configuration set." })));
  const view = (shown || all).data;
  $("#config-hash").textContent = (view.agent ? "Effective config of " + view.agent : "Global config") + " · hash " + view.hash;
  $("#config-doc").textContent = JSON.stringify(view.config, null, 2);
}

// ---- audit ---------------------------------------------------------------

async function loadAudit() {
  const q = new URLSearchParams({ limit: "50" });
  for (const name of ["since", "agent", "actor"]) {
    const v = $("#audit-" + name).value.trim();
    if (v) q.set(name, v);
  }
  const after = state.auditAfter[state.auditAfter.length - 1];
  if (after !== undefined) q.set("after", String(after));
  const note = $("#audit-note");
  const tbody = clear($("#audit-table tbody"));
  let data;
  try {
    data = (await api("GET", "/v1/admin/audit?" + q.toString())).data;
  } catch (e) {
    if (e.status !== 404) throw e;
    note.textContent = "This server keeps no audit log that the console can read.";
    note.hidden = false;
    $("#audit-more").disabled = true;
    return;
  }
  note.hidden = true;
  for (const x of data.entries || []) {
    tbody.append(
      el(
        "tr",
        { class: x.outcome === "ok" ? "" : "refused" },
        el("td", { class: "num", text: x.seq }),
        el("td", { text: x.time }),
        el("td", { text: x.actor }),
        el("td", { text: x.source }),
        el("td", { text: x.action }),
        el("td", { class: "mono", text: x.target || "" }),
        el("td", { text: x.outcome }),
        el("td", { text: typeof x.detail === "string" ? x.detail : JSON.stringify(x.detail || "") }),
      ),
    );
  }
  if (!(data.entries || []).length) tbody.append(el("tr", {}, el("td", { colSpan: 8, class: "muted", text: "No entries." })));
  state.auditNext = data.next === undefined ? null : data.next;
  $("#audit-more").disabled = state.auditNext === null;
}

// ---- wiring --------------------------------------------------------------

function start() {
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = $("#token").value.trim();
    if (!t) return;
    $("#login-button").disabled = true;
    try {
      await login(t);
      $("#token").value = "";
      showApp();
    } catch (e) {
      showLogin(explainLoginFailure(e));
    } finally {
      $("#login-button").disabled = false;
    }
  });
  $("#logout").addEventListener("click", () => {
    location.hash = "";
    showLogin("");
  });
  $("#filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.fleetOffset = 0;
    refresh();
  });
  $("#filter-status").addEventListener("change", () => {
    state.fleetOffset = 0;
    refresh();
  });
  $("#filter-clear").addEventListener("click", () => {
    $("#filters").reset();
    state.fleetOffset = 0;
    refresh();
  });
  $("#page-prev").addEventListener("click", () => {
    state.fleetOffset = Math.max(0, state.fleetOffset - PAGE_SIZE);
    refresh();
  });
  $("#page-next").addEventListener("click", () => {
    state.fleetOffset += PAGE_SIZE;
    refresh();
  });
  $("#config-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.configAgent = $("#config-agent").value.trim();
    refresh();
  });
  $("#audit-filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.auditAfter = [];
    refresh();
  });
  $("#audit-more").addEventListener("click", () => {
    if (state.auditNext === null) return;
    state.auditAfter.push(state.auditNext);
    refresh();
  });
  $("#audit-newest").addEventListener("click", () => {
    state.auditAfter = [];
    refresh();
  });
  window.addEventListener("hashchange", route);

  const saved = token();
  if (!saved) return showLogin("");
  login(saved)
    .then(showApp)
    .catch((e) => showLogin(explainLoginFailure(e)));
}

start();
