// deltafleet web console: plain JavaScript, no build step, no CDN.
//
// Every string from the API (device ids, labels, cpu names, reasons) reaches the page through
// textContent / text nodes (see el()); nothing is ever assigned to innerHTML, so a hostile
// device cannot inject markup. Writes send the CSRF token (double submit: the fleet_csrf
// cookie echoed in X-CSRF-Token); the session itself is an HttpOnly cookie.
"use strict";

const API = "/api/v1";
const ROLES = ["viewer", "operator", "admin"];
let me = null;       // {name, role}
let live = null;     // the live page's event stream (closed when the page changes)
const FINAL = ["completed", "aborted", "rolled_back", "superseded"];
const EVENTS_SHOWN = 200;  // device events kept on the live page, newest first

// -- DOM helpers (text only) ---------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "href") node.href = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {class: h.num ? "num" : ""}, h.t || h)))),
    el("tbody", {}, rows.length ? rows : [el("tr", {}, el("td", {colspan: headers.length, class: "muted"}, "none"))]));
}

function row(...cells) {
  return el("tr", {}, cells.map((c) => (c instanceof Node && c.tagName === "TD") ? c : el("td", {}, c)));
}

function num(v) { return el("td", {class: "num"}, v); }
function stateSpan(s) { return el("span", {class: "state state-" + s}, s); }
function link(text, hash) { return el("a", {href: "#" + hash}, text); }

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : "-"; }
function labelsText(labels) {
  return Object.entries(labels || {}).sort().map(([k, v]) => `${k}=${v}`).join(", ") || "-";
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

// -- API -------------------------------------------------------------------------------------
function csrf() {
  const m = document.cookie.split("; ").find((c) => c.startsWith("fleet_csrf="));
  return m ? decodeURIComponent(m.slice("fleet_csrf=".length)) : "";
}

class Problem extends Error {
  constructor(p) { super(p.detail || p.title || "error"); this.status = p.status; }
}

async function api(path, opts) {
  const o = Object.assign({method: "GET", credentials: "same-origin", headers: {}}, opts || {});
  if (o.method !== "GET") {
    o.headers["X-CSRF-Token"] = csrf();
    if (o.json !== undefined) {
      o.headers["Content-Type"] = "application/json";
      o.body = JSON.stringify(o.json);
    }
  }
  const r = await fetch(API + path, o);
  const body = r.status === 204 ? null : await r.json().catch(() => ({}));
  if (!r.ok) {
    if (r.status === 401 && path !== "/session") { me = null; go("/login"); }
    throw new Problem(body || {status: r.status});
  }
  return body;
}

function can(role) { return me && ROLES.indexOf(me.role) >= ROLES.indexOf(role); }
function go(hash) { if (location.hash !== "#" + hash) location.hash = hash; else route(); }

function errorBox(e) { return el("p", {class: "error", role: "alert"}, e.message || String(e)); }

// -- pages -----------------------------------------------------------------------------------
function loginPage() {
  const input = el("input", {type: "password", id: "token", name: "token", autocomplete: "off",
                             placeholder: "dft_…", required: true});
  const msg = el("p", {class: "error", id: "login-error", role: "alert"});
  const form = el("form", {id: "login-form", onsubmit: async (ev) => {
    ev.preventDefault();
    msg.textContent = "";
    try {
      me = await api("/session", {method: "POST", json: {token: input.value.trim()}});
      input.value = "";
      chrome();
      go("/");
    } catch (e) { msg.textContent = e.message; }
  }},
  el("label", {}, "API token (from `fleetctl token create`)", input),
  el("button", {type: "submit", id: "login-submit"}, "Log in"), msg);
  show(el("div", {class: "login"}, el("h1", {}, "Log in"), form));
}

async function fleetPage(params) {
  const q = new URLSearchParams(params);
  const [summary, devices] = await Promise.all([api("/fleet/summary"), api("/devices?" + q)]);
  const card = (n, k, id) => el("div", {class: "card", id}, el("div", {class: "n"}, n), el("div", {class: "k"}, k));
  const byModel = Object.entries(summary.by_model).map(([k, n]) => row(k, num(n)));
  const byState = Object.entries(summary.by_state).map(([k, n]) => row(stateSpan(k), num(n)));
  const field = (name, label, input) => el("label", {}, label, input);
  const text = (name) => el("input", {name, value: q.get(name) || "", size: 14});
  const online = el("select", {name: "online"}, ["", "true", "false"].map((v) =>
    el("option", {value: v, selected: (q.get("online") || "") === v}, v === "" ? "any" : v === "true" ? "online" : "offline")));
  const filters = el("form", {class: "filters", id: "device-filters", onsubmit: (ev) => {
    ev.preventDefault();
    const f = new URLSearchParams();
    for (const [k, v] of new FormData(ev.target)) if (v) f.append(k, v);
    go("/?" + f);
  }},
  field("q", "device id contains", text("q")), field("online", "presence", online),
  field("model", "runs model", text("model")), field("version", "version", text("version")),
  field("state", "update state", text("state")), field("label", "label KEY=VALUE", text("label")),
  field("group", "group", text("group")),
  el("button", {type: "submit"}, "Filter"));
  const rows = devices.items.map((d) => row(
    link(d.id, "/device/" + encodeURIComponent(d.id)),
    el("span", {class: d.online ? "online" : "offline"}, d.online ? "online" : "offline"),
    d.running.map((m) => `${m.model}:${m.version || "?"}`).join(", ") || "-",
    d.desired.map((x) => `${x.model}:${x.version || "?"} r${x.rollout_id} ${x.state}`).join(", ") || "-",
    labelsText(d.labels), when(d.last_seen)));
  show(el("h1", {}, "Fleet"),
    el("div", {class: "cards"}, card(summary.devices, "devices", "card-devices"),
       card(summary.online, "online", "card-online"), card(summary.offline, "offline", "card-offline"),
       card(summary.active_rollouts, "active rollouts", "card-rollouts")),
    el("h2", {}, "By model version"), table(["model:version", {t: "devices", num: true}], byModel),
    el("h2", {}, "By update state"), table(["state", {t: "devices", num: true}], byState),
    el("h2", {}, "Devices"), filters,
    pager(q, devices),
    table(["device", "presence", "runs", "asked to run", "labels", "last seen"], rows, {id: "devices"}));
}

function pager(q, page) {
  const at = (offset) => { const n = new URLSearchParams(q); n.set("offset", String(offset)); return "/?" + n; };
  const end = page.offset + page.items.length;
  return el("div", {class: "pager", id: "pager"},
    el("span", {class: "muted"}, page.total ? `devices ${page.offset + 1}-${end} of ${page.total}` : "no devices"),
    page.offset > 0 ? link("previous", at(Math.max(0, page.offset - page.limit))) : null,
    end < page.total ? link("next", at(end)) : null);
}

async function devicePage(id) {
  const base = "/devices/" + encodeURIComponent(id);
  const [d, h, v, models] = await Promise.all([api(base), api(base + "/history"),
                                               api(base + "/variants"), api("/models")]);
  const names = variantNames(models);
  const p = d.profile;
  const facts = [["online", d.online ? "yes" : "no"], ["last seen", when(d.last_seen)],
    ["hardware id", d.hardware_id || "-"], ["agent", d.agent_version || "-"], ["arch", p.arch || "-"],
    ["os", p.os || "-"], ["cpu", p.cpu || "-"], ["accelerator", p.accelerator || "-"],
    ["memory", bytes(p.memory_bytes)], ["disk free", bytes(p.disk_free_bytes)],
    ["runtimes", Object.entries(p.runtimes).map(([k, v]) => `${k} ${v}`).join(", ") || "-"]];
  const labels = Object.entries(d.labels).sort().map(([k, v]) => row(k, v));
  show(el("h1", {}, "Device ", el("span", {class: "mono", id: "device-id"}, d.id)),
    table(["field", "value"], facts.map(([k, v]) => row(k, v))),
    el("h2", {}, "Labels"), table(["key", "value"], labels, {id: "labels"}),
    el("h2", {}, "Runs (as the device reported)"),
    table(["model", "version", "variant", "since", "sha256"], d.running.map((m) =>
      row(m.model, m.version || "?", m.variant || "-", when(m.updated_at), el("span", {class: "mono"}, m.sha256.slice(0, 12)))), {id: "running"}),
    el("h2", {}, "Asked to run (not running yet)"),
    table(["model", "version", "variant", "rollout", "state", "why"], d.desired.map((x) =>
      row(x.model, x.version || "?", x.variant || "-", link("r" + x.rollout_id, "/rollout/" + x.rollout_id), stateSpan(x.state), x.why)), {id: "desired"}),
    el("h2", {}, "Why this variant (newest rollout per model)"),
    table(["model", "version", "rollout", "state", "sent", "picked now", "why", "delta or full"], v.models.map((x) =>
      row(x.model, x.version, link("r" + x.rollout_id, "/rollout/" + x.rollout_id), stateSpan(x.state),
        x.variant || "-", x.chosen_now || "none", x.why, x.delivery || "-")), {id: "variants"}),
    el("h2", {}, "Portrait"), portrait(d.portrait),
    el("h2", {}, "Own benchmarks"),
    table(["model:version/variant", "runtime", {t: "load", num: true}, {t: "p50", num: true}, {t: "p95", num: true},
           {t: "model memory", num: true}, {t: "energy/inf", num: true}, {t: "runs", num: true}, "measured", "error"],
      (d.benchmarks || []).map((b) => row(names[b.sha256] || `${b.variant} (${b.sha256.slice(0, 12)})`,
        `${b.runtime} ${b.runtime_version}`, num(b.load_ms === null ? "-" : `${b.load_ms} ms`),
        num(b.p50_us === null ? "-" : `${b.p50_us} µs`), num(b.p95_us === null ? "-" : `${b.p95_us} µs`),
        num(bytes(b.model_rss_bytes)), num(b.energy_uj === null ? "-" : `${b.energy_uj} µJ`),
        num(b.runs === null ? "-" : b.runs), when(b.measured_at), b.error || "")), {id: "benchmarks"}),
    el("h2", {}, "History"),
    table(["rollout", "model", "version", "state", "attempts", "artifact", "sent", "reason", "updated"],
      h.rollouts.map((t) => row(link("r" + t.rollout_id, "/rollout/" + t.rollout_id), t.model, t.version,
        stateSpan(t.state), num(t.attempts), t.artifact || "-", num(bytes(t.bytes_sent)), t.reason || "", when(t.updated_at))), {id: "history"}),
    el("h2", {}, "Reported events"),
    table(["at", "state"], h.events.map((e) => row(when(e.at), stateSpan(e.state)))));
}

// model sha256 -> "model:version/variant", from GET /models
function variantNames(models) {
  const out = {};
  for (const m of models) for (const v of m.versions) for (const x of v.variants) {
    if (!(x.sha256 in out)) out[x.sha256] = `${m.name}:${v.version}/${x.name}`;
  }
  return out;
}

// what the device can use (docs/portraits.md): every field as text
function portrait(p) {
  if (!p) return el("p", {class: "muted", id: "portrait"}, "no portrait yet (the agent sends one after its hello)");
  const doc = p.portrait || {};
  const probes = (xs) => (xs || []).map((x) => `${x.name}${x.ok ? "" : " (failed" + (x.error ? ": " + x.error : "") + ")"}`).join(", ") || "-";
  const cpu = doc.cpu || {}, mem = doc.memory || {}, disk = doc.disk || {};
  const rows = [["device type", p.device_type], ["updated", when(p.updated_at)],
    ["accelerators", (doc.accelerators || []).join(", ") || "-"],
    ["providers", probes(doc.providers)], ["delegates", probes(doc.delegates)],
    ["cpu", [cpu.count ? `${cpu.count} ×` : "", cpu.model || "", (cpu.flags || []).length ? `(${cpu.flags.join(", ")})` : ""].filter(Boolean).join(" ") || "-"],
    ["memory", `${bytes(mem.available_bytes)} available of ${bytes(mem.total_bytes)}` +
      (mem.cgroup_headroom_bytes !== undefined && mem.cgroup_headroom_bytes !== null ? `, cgroup headroom ${bytes(mem.cgroup_headroom_bytes)}` : "")],
    ["disk", `${bytes(disk.free_bytes)} free of ${bytes(disk.total_bytes)}`],
    ["runtimes", Object.entries(doc.runtimes || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "-"],
    ["power sensors", (doc.power || []).map((x) => `${x.name} (${x.kind})`).join(", ") || "-"]];
  return table(["field", "value"], rows.map(([k, v]) => row(k, v)), {id: "portrait"});
}

async function modelsPage() {
  const [models, deltas] = await Promise.all([api("/models"), api("/deltas?limit=500")]);
  const rows = [];
  for (const m of models) for (const v of m.versions) for (const x of v.variants) {
    rows.push(row(m.name, v.version, x.name, x.format, x.precision, num(bytes(x.size_bytes)),
      num(x.compressed ? bytes(x.compressed.size_bytes) : "-"),
      el("span", {class: "mono"}, x.sha256.slice(0, 12)), when(x.created_at)));
  }
  const nodes = [el("h1", {}, "Model catalog"),
    table(["model", "version", "variant", "format", "precision", {t: "size", num: true},
           {t: "full install (zstd)", num: true}, "sha256", "added"], rows, {id: "models"}),
    el("h2", {}, "Deltas"),
    el("p", {class: "muted"}, `${deltas.total} delta(s): built ones are shipped instead of the full install when worth it`),
    table(["from", "to", "state", "codec", {t: "size", num: true}, {t: "full install", num: true},
           {t: "% of full", num: true}, "reason", "built"],
      deltas.items.map((x) => row(x.base || x.base_sha256.slice(0, 12), x.target || x.target_sha256.slice(0, 12),
        stateSpan(x.state), x.codec || "-", num(bytes(x.size_bytes)), num(bytes(x.full_artifact_bytes)),
        num(x.ratio === null ? "-" : `${(100 * x.ratio).toFixed(1)}%`),
        x.reason || (x.worth_sending === false ? "not worth sending: the full install is used" : ""),
        when(x.created_at))), {id: "deltas"})];
  if (can("admin")) nodes.push(el("h2", {}, "Register a version"), uploadForm());
  show(...nodes);
}

function uploadForm() {
  const msg = el("p", {class: "error", role: "alert"});
  return el("form", {class: "filters", id: "upload", onsubmit: async (ev) => {
    ev.preventDefault();
    const data = new FormData(ev.target);
    const name = data.get("name");
    data.delete("name");
    try {
      const r = await fetch(`${API}/models/${encodeURIComponent(name)}/versions`, {
        method: "POST", body: data, credentials: "same-origin", headers: {"X-CSRF-Token": csrf()}});
      const body = await r.json();
      if (!r.ok) throw new Problem(body);
      route();
    } catch (e) { msg.textContent = e.message; }
  }},
  el("label", {}, "model", el("input", {name: "name", required: true, size: 12})),
  el("label", {}, "version", el("input", {name: "version", required: true, size: 8})),
  el("label", {}, "variant", el("input", {name: "variant", value: "default", size: 10})),
  el("label", {}, "precision", el("input", {name: "precision", value: "fp32", size: 6})),
  el("label", {}, "ONNX / TFLite file", el("input", {name: "file", type: "file", required: true})),
  el("button", {type: "submit"}, "Upload"), msg);
}

async function rolloutsPage() {
  const r = await api("/rollouts?limit=200");
  show(el("h1", {}, "Rollouts"),
    table([{t: "id", num: true}, "model", "version", "group", "state", "wave", {t: "devices", num: true},
           {t: "sent", num: true}, {t: "full", num: true}, "by", "created"],
      r.items.map((x) => row(el("td", {class: "num"}, link(String(x.id), "/rollout/" + x.id)), x.model, x.version,
        x.group, stateSpan(x.state), String(x.current_wave + 1),
        num(Object.values(x.counts).reduce((a, b) => a + b, 0)), num(bytes(x.bytes_sent)),
        num(bytes(x.full_bytes)), x.created_by || "-", when(x.created_at))), {id: "rollouts"}));
}

async function rolloutPage(id) {
  const msg = el("p", {class: "error", id: "action-error", role: "alert"});
  const actions = el("div", {class: "actions", id: "actions"});
  if (can("operator")) {
    for (const [action, cls] of [["pause", "secondary"], ["resume", "secondary"], ["abort", "danger"], ["rollback", "danger"]]) {
      actions.append(el("button", {type: "button", id: "btn-" + action, class: cls, onclick: async () => {
        msg.textContent = "";
        try { await api(`/rollouts/${id}/${action}`, {method: "POST", json: {}}); render(await api("/rollouts/" + id)); }
        catch (e) { msg.textContent = e.message; }
      }}, action));
    }
  } else {
    actions.append(el("span", {class: "muted", id: "readonly-note"},
      `read only: token ${me ? me.name : ""} (${me ? me.role : ""}) cannot act on rollouts`));
  }
  const head = el("div", {id: "rollout-head"});
  const waves = el("div", {id: "waves"});
  const devices = el("div", {id: "targets"});
  const total = el("p", {id: "bytes"});
  const events = el("tbody", {});
  const streamNote = el("span", {class: "muted", id: "stream-state"}, "connecting…");
  show(el("h1", {}, "Rollout ", String(id)), head, actions, msg, el("h2", {}, "Waves"), waves,
       el("h2", {}, "Devices"), devices, total,
       el("h2", {}, "Device events ", streamNote),
       el("table", {id: "events"}, el("thead", {}, el("tr", {}, ["at", "device", "move", "reason"].map((t) => el("th", {}, t)))), events));

  function render(r) {
    head.replaceChildren(el("p", {}, `${r.model} ${r.version} → group ${r.group} · `,
      el("span", {id: "rollout-state", class: "state state-" + r.state}, r.state),
      ` · wave ${r.current_wave + 1}`, r.state_reason ? ` · ${r.state_reason}` : ""));
    const byWave = {};
    for (const t of r.targets) {
      const w = byWave[t.wave] || (byWave[t.wave] = {});
      w[t.state] = (w[t.state] || 0) + 1;
    }
    waves.replaceChildren(table(["wave", {t: "devices", num: true}, "states"],
      Object.keys(byWave).sort((a, b) => a - b).map((w) => row(String(+w + 1),
        num(Object.values(byWave[w]).reduce((a, b) => a + b, 0)),
        Object.entries(byWave[w]).sort().map(([k, n]) => `${k} ${n}`).join(", ")))));
    devices.replaceChildren(table(["device", "wave", "state", "variant", "artifact", {t: "sent", num: true}, {t: "full", num: true}, "reason"],
      r.targets.map((t) => row(link(t.device, "/device/" + encodeURIComponent(t.device)), String(t.wave + 1),
        stateSpan(t.state), t.variant || "-", t.artifact || "-", num(bytes(t.bytes_sent)), num(bytes(t.full_bytes)), t.reason || ""))));
    total.textContent = r.full_bytes ? `bytes sent ${bytes(r.bytes_sent)} of ${bytes(r.full_bytes)} full ` +
      `(${(100 * r.bytes_sent / r.full_bytes).toFixed(1)}%)` : "";
    for (const b of actions.querySelectorAll("button")) {
      b.disabled = !r.actions.includes(b.id.slice("btn-".length));  // what the state allows now
    }
  }

  function addEvent(e) {  // newest first; every field as text
    events.prepend(el("tr", {"data-id": e.id}, el("td", {}, when(e.at)),
      el("td", {}, link(e.device, "/device/" + encodeURIComponent(e.device))),
      el("td", {}, e.from ? stateSpan(e.from) : "new", " → ", stateSpan(e.to)),
      el("td", {}, e.reason || "")));
    while (events.children.length > EVENTS_SHOWN) events.lastChild.remove();
  }

  render(await api("/rollouts/" + id));
  // device events and status changes as server-sent events; the browser resumes after the
  // last event it saw (Last-Event-ID) when the connection drops
  const source = new EventSource(`${API}/rollouts/${id}/stream`);
  live = source;
  source.addEventListener("open", () => { streamNote.textContent = "live"; });
  source.addEventListener("device", (ev) => addEvent(JSON.parse(ev.data)));
  source.addEventListener("status", (ev) => {
    const r = JSON.parse(ev.data);
    render(r);
    if (FINAL.includes(r.state)) { source.close(); streamNote.textContent = `ended: ${r.state}`; }
  });
  source.addEventListener("end", (ev) => {
    source.close();
    streamNote.textContent = "ended: " + JSON.parse(ev.data).reason;
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) streamNote.textContent = "disconnected (reload the page)";
    else if (streamNote.textContent === "live") streamNote.textContent = "reconnecting…";
  });
}

// -- router ------------------------------------------------------------------------------------
function chrome() {
  document.getElementById("nav").hidden = !me;
  document.getElementById("logout").hidden = !me;
  document.getElementById("who").textContent = me ? `${me.name} (${me.role})` : "";
}

async function route() {
  if (live) { live.close(); live = null; }
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  if (path === "/login") { me = null; chrome(); loginPage(); return; }
  try {
    if (!me) { me = await api("/whoami"); chrome(); }
    let m;
    if (path === "/" || path === "") await fleetPage(query || "");
    else if ((m = path.match(/^\/device\/(.+)$/))) await devicePage(decodeURIComponent(m[1]));
    else if (path === "/models") await modelsPage();
    else if (path === "/rollouts") await rolloutsPage();
    else if ((m = path.match(/^\/rollout\/(\d+)$/))) await rolloutPage(+m[1]);
    else show(el("h1", {}, "Not found"), el("p", {}, hash));
  } catch (e) {
    if (e.status !== 401) show(errorBox(e));
  }
}

document.getElementById("logout").addEventListener("click", async () => {
  try { await api("/session", {method: "DELETE"}); } catch (e) { /* gone already */ }
  me = null;
  go("/login");
});
window.addEventListener("hashchange", route);
route();
