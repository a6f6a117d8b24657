// taskgate review page. Reads the control plane's JSON endpoints with the session
// cookie; every mutating request carries the page's CSRF token as a header. Data is
// only ever put into the page as text (textContent), never as HTML.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const TAIL_MS = 2000;
const PANELS_MS = 4000;
const REFUSED = new Set(["deny", "rejected", "error"]);

const state = {
  filters: {},
  task: null,         // the task whose timeline is shown (oldest first), or null
  lastSeq: null,      // where the live tail goes on from (the answer's tail cursor)
  older: null,        // the cursor for older calls
  tasks: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") {
    opts.headers["X-CSRF-Token"] = CSRF;
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body || {});
  }
  const resp = await fetch(path, opts);
  if (resp.status === 401) {
    location.assign("/ui");  // the session ended: back to the sign-in form
    throw new Error("signed out");
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  return { status: resp.status, data };
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "status error" : "status";
}

function fmtTime(ts) {
  if (!ts) return "";
  const d = new Date(typeof ts === "number" ? ts * 1000 : ts);
  return isNaN(d) ? String(ts) : d.toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function listOf(data, key) {
  if (Array.isArray(data)) return data;
  if (data && Array.isArray(data[key])) return data[key];
  return [];
}

// Agent-controlled text is shown as text, and what a screen would hide or reorder —
// controls, bidi overrides and isolates, zero-width and other invisible characters —
// is shown as a visible \u escape (newlines only where `keepLines` says so).
const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u061c\u115f\u1160\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\ufff0-\ufffb\u{e0000}-\u{e0fff}]/gu;
function visible(value, keepLines) {
  const text = String(value ?? "");
  const out = text.replace(HIDDEN, (c) => `\\u${c.codePointAt(0).toString(16).padStart(4, "0")}`);
  return keepLines ? out : out.replace(/[\n\t]/g, (c) => (c === "\n" ? "\\n" : "\\t"));
}

function notAvailable(panel, what) {
  panel.replaceChildren(el("span", { class: "na" }, `${what}: not available in this gateway`));
}

// -- tasks -------------------------------------------------------------------
function taskId(t) { return t.task_id ?? t.id ?? ""; }

function taskCalls(t) {
  const used = t.calls_used ?? t.used ?? (t.calls && t.calls.used);
  let left = t.calls_left ?? t.left ?? (t.calls && t.calls.left);
  if (left === undefined && t.max_calls != null && used != null) left = t.max_calls - used;
  return [used ?? "", left ?? ""];
}

function taskStatus(t) {
  if (t.status) return t.status;
  if (t.revoked || t.revoked_at) return "revoked";
  return "";
}

async function loadTasks() {
  const panel = $("tasks-body");
  const { status, data } = await api("GET", "/v1/tasks");
  if (status === 404) return notAvailable(panel, "Tasks");
  if (status !== 200) {
    panel.replaceChildren(el("span", { class: "error" }, `tasks: ${status} ${data && data.reason || ""}`));
    return;
  }
  state.tasks = listOf(data, "tasks");
  if (!state.tasks.length) {
    panel.replaceChildren(el("span", { class: "muted" }, "No tasks."));
    return;
  }
  const rows = state.tasks.map((t) => {
    const id = taskId(t);
    const [used, left] = taskCalls(t);
    const row = el("tr", { class: "task-row" + (id === state.task ? " selected" : ""),
                           "data-task": id, on: { click: () => showTask(id) } },
      el("td", {}, visible(id)), el("td", {}, visible(t.workload)), el("td", {}, visible(t.owner)),
      el("td", {}, visible(t.purpose)), el("td", {}, fmtTime(t.expires_at)),
      el("td", {}, used), el("td", {}, left), el("td", {}, taskStatus(t)));
    return row;
  });
  panel.replaceChildren(el("table", { id: "tasks-table" },
    el("thead", {}, el("tr", {}, ...["Task", "Workload", "Owner", "Purpose", "Expires",
                                      "Calls used", "Calls left", "Status"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows)));
  renderTaskDetail();  // the shown task's budget and status move as its calls happen
}

function showTask(id) {
  state.task = id;
  $("filters").elements.task.value = id;
  applyFilters();
}

function renderTaskDetail() {
  const box = $("task-detail");
  if (!state.task) { box.hidden = true; return; }
  const t = state.tasks.find((x) => taskId(x) === state.task);
  box.hidden = false;
  if (!t) {
    box.replaceChildren(el("strong", {}, `Timeline of task ${state.task}`));
    return;
  }
  const [used, left] = taskCalls(t);
  box.replaceChildren(
    el("strong", {}, `Timeline of task ${state.task}`),
    el("div", {}, visible(`owner ${t.owner ?? "?"} · purpose ${t.purpose ?? "?"} · expires ${fmtTime(t.expires_at)}` +
                          ` · calls used ${used} · left ${left} · ${taskStatus(t)}`)));
}

// -- approvals ---------------------------------------------------------------
function approvalId(a) { return a.id ?? a.approval_id ?? ""; }

function approvalUrl(a) {
  if (a.url) return a.url;
  const port = a.port ? `:${a.port}` : "";
  return `${a.scheme ?? "https"}://${a.host ?? ""}${port}${a.path ?? ""}`;
}

async function decide(id, verdict) {
  const by = $("approver").value.trim();
  if (!by) {
    setStatus("Enter your name (Approving as…) before approving or denying.", true);
    $("approver").focus();
    return;
  }
  localStorage.setItem("taskgate.approver", by);
  const comment = document.querySelector(`[data-comment="${CSS.escape(id)}"]`);
  const { status, data } = await api("POST", `/v1/approvals/${encodeURIComponent(id)}/${verdict}`,
                                     { by, comment: comment ? comment.value : "" });
  setStatus(status < 300 ? `${verdict === "approve" ? "Approved" : "Denied"} ${id}`
                         : `${verdict} ${id}: ${status} ${data && data.reason || ""}`, status >= 300);
  await loadApprovals();
  await tail();
}

async function loadApprovals() {
  const panel = $("approvals-body");
  const { status, data } = await api("GET", "/v1/approvals");
  if (status === 404) return notAvailable(panel, "Approvals");
  if (status !== 200) {
    panel.replaceChildren(el("span", { class: "error" }, `approvals: ${status} ${data && data.reason || ""}`));
    return;
  }
  const waiting = listOf(data, "approvals");
  if (!waiting.length) {
    panel.replaceChildren(el("span", { class: "muted" }, "Nothing is waiting."));
    return;
  }
  panel.replaceChildren(...waiting.map((a) => {
    const id = approvalId(a);
    const calls = Array.isArray(a.calls) && a.calls.length ? a.calls : null;
    const tool = toolText(a.tool);
    return el("div", { class: "approval", "data-approval": id },
      el("div", {},
        el("strong", { class: "held-call" }, visible(`${a.method ?? ""} ${approvalUrl(a)}`)),
        el("div", { class: "muted" }, visible(
           `task ${a.task ?? "-"} · workload ${a.workload ?? "-"} · owner ${a.owner ?? "-"}` +
           (a.purpose ? ` · ${a.purpose}` : "") +
           (a.age_seconds != null ? ` · waiting ${Math.round(a.age_seconds)} s` : "") +
           (a.expires_at ? ` · until ${fmtTime(a.expires_at)}` : ""))),
        tool && !calls ? el("div", {}, visible(`tool ${tool}`)) : null,
        calls ? el("pre", { class: "held-tools" },
                   calls.map((c) => visible(`${c.name}(${JSON.stringify(c.arguments ?? {})})`)).join("\n"))
              : null,
        heldRequest(a.request)),
      el("div", { class: "actions" },
        el("input", { "data-comment": id, placeholder: "comment", maxlength: "500" }),
        el("button", { class: "approve", type: "button", on: { click: () => decide(id, "approve") } }, "Approve"),
        el("button", { class: "deny", type: "button", on: { click: () => decide(id, "deny") } }, "Deny")));
  }));
}

// -- MCP tool changes (tool pinning) --------------------------------------------
async function acceptChange(id) {
  const by = $("approver").value.trim();
  if (!by) {
    setStatus("Enter your name (Approving as…) before accepting a tool change.", true);
    $("approver").focus();
    return;
  }
  localStorage.setItem("taskgate.approver", by);
  const { status, data } = await api("POST", `/v1/tools/changes/${encodeURIComponent(id)}/accept`,
                                     { by });
  setStatus(status < 300 ? `Accepted tool change ${id}`
                         : `accept ${id}: ${status} ${data && data.reason || ""}`, status >= 300);
  await loadToolChanges();
}

async function loadToolChanges() {
  const panel = $("tool-changes-body");
  const { status, data } = await api("GET", "/v1/tools/changes");
  if (status === 404) return notAvailable(panel, "Tool pinning");
  if (status !== 200) {
    panel.replaceChildren(el("span", { class: "error" }, `tool changes: ${status} ${data && data.reason || ""}`));
    return;
  }
  const changes = listOf(data, "changes");
  if (!changes.length) {
    panel.replaceChildren(el("span", { class: "muted" }, "No tool has changed."));
    return;
  }
  panel.replaceChildren(...changes.map((c) => el("div", { class: "approval", "data-change": c.id },
    el("div", {},
      el("strong", {}, visible(`${c.tool} · ${c.server}`)),
      el("div", {}, visible(c.what)),
      el("div", { class: "muted" }, visible(
        `${c.subject} · seen ${fmtTime(c.at)} · now ${c.seen && c.seen.digest}` +
        (c.pinned ? ` · pinned ${c.pinned.digest}` : ` · rule ${c.rule} pins ${c.rule_pin}`)))),
    el("div", { class: "actions" },
      c.acceptable
        ? el("button", { class: "approve", type: "button", on: { click: () => acceptChange(c.id) } }, "Accept")
        : el("span", { class: "muted" }, "pinned by a rule: change the rule")))));
}

// What will be forwarded, but for the gateway's secret: headers, the body (or its start),
// its size and SHA-256, and the digest the record keeps with the approval.
function heldRequest(r) {
  if (!r || typeof r !== "object") return null;
  const headers = Array.isArray(r.headers) ? r.headers : [];
  const body = r.body && typeof r.body === "object" ? r.body : {};
  const size = Number(body.size) || 0;
  const about = size
    ? `body ${size} bytes (${visible(body.encoding)}${body.truncated ? `, first ${Number(body.shown_bytes) || 0} bytes shown` : ""}) · sha256 ${visible(body.sha256)}`
    : "no body";
  return el("div", { class: "held-request" },
    headers.length ? el("pre", { class: "held-headers" },
                        headers.map((h) => `${visible(h[0])}: ${visible(h[1])}`).join("\n")) : null,
    r.secret ? el("div", { class: "muted" }, `secret ${visible(r.secret)} is added by the gateway after approval`) : null,
    el("div", { class: "muted held-body-about" }, about),
    size ? el("pre", { class: "held-body" }, visible(body.shown, true)) : null,
    el("div", { class: "muted held-digest" }, `digest ${visible(r.digest)}`));
}

// -- calls -------------------------------------------------------------------
function callText(r) {
  if (r.method === "CONNECT") return `CONNECT ${r.host ?? ""}:${r.port ?? ""}`;
  const dflt = { http: 80, https: 443 }[r.scheme];
  const port = r.port && r.port !== dflt ? `:${r.port}` : "";
  return `${r.method ?? ""} ${r.scheme ?? ""}://${r.host ?? ""}${port}${r.path ?? ""}`;
}

function toolText(tool) {
  if (!tool) return "";
  if (Array.isArray(tool)) return tool.map(toolText).join(", ");
  if (typeof tool === "object") return tool.name ?? "";
  return String(tool);
}

function reasonText(r) {
  let text = r.reason ?? "";
  const a = r.approval;
  if (a && typeof a === "object" && a.by) {
    const outcome = a.outcome ?? (r.decision === "rejected" ? "rejected" : "approved");
    const comment = a.comment ? ` “${a.comment}”` : "";
    const who = `${outcome} by ${a.by}`;
    if (text === who || text === `${who}: ${a.comment}`) text = "";  // say it once
    text += `${text ? " — " : ""}${who}${comment}`;
  }
  return text;
}

function callRow(r, fresh) {
  const d = r.decision ?? "";
  const cls = [`d-${d}`, REFUSED.has(d) ? "refused" : "", d === "held" ? "held" : "",
               d === "would_deny" ? "would" : "", fresh ? "fresh" : ""];
  return el("tr", { class: cls.filter(Boolean).join(" "), "data-seq": String(r.seq),
                    "data-decision": d },
    el("td", {}, fmtTime(r.ts)),
    el("td", {}, el("span", { class: "badge" }, d)),
    el("td", {}, r.status ?? ""),
    el("td", {}, visible(r.workload)),
    el("td", {}, r.task ? el("button", { class: "task-link", type: "button", title: "show this task's timeline",
                                         on: { click: () => showTask(r.task) } }, r.task) : ""),
    el("td", { class: "call" }, visible(callText(r))),
    el("td", {}, visible(toolText(r.tool))),
    el("td", {}, visible(r.rule)),
    el("td", {}, visible(r.secret)),
    el("td", {}, visible(reasonText(r))),
    el("td", {}, r.duration_ms ?? ""));
}

function query(extra) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries({ ...state.filters, ...extra })) {
    if (v !== "" && v !== null && v !== undefined) params.set(k, v);
  }
  return `/v1/audit?${params}`;
}

function showCallsError(status, data) {
  const p = $("calls-error");
  p.hidden = status === 200;
  p.textContent = status === 200 ? "" : `calls: ${status} ${data && data.reason || ""}`;
}

async function loadCalls() {
  const body = $("calls-body");
  // A task's timeline reads oldest first; the general view newest first.
  const { status, data } = await api("GET", state.task ? query({ after: 0, limit: 1000 })
                                                       : query({ limit: 100 }));
  showCallsError(status, data);
  if (status !== 200) return;
  const recs = data.records;
  body.replaceChildren(...recs.map((r) => callRow(r, false)));
  // Where the live tail goes on from: a seq, or one per log with workers (an opaque cursor).
  state.lastSeq = data.tail ?? String(Math.max(data.last_seq ?? 0, ...recs.map((r) => r.seq), 0));
  state.older = state.task ? null : data.next;
  $("older").hidden = !state.older;
  $("calls-title").textContent = state.task ? `Calls of task ${state.task}` : "Calls";
  renderTaskDetail();
}

async function loadOlder() {
  if (!state.older) return;
  const { status, data } = await api("GET", state.older);
  showCallsError(status, data);
  if (status !== 200) return;
  $("calls-body").append(...data.records.map((r) => callRow(r, false)));
  state.older = data.next;
  $("older").hidden = !state.older;
}

async function tail() {
  if (state.lastSeq === null) return;
  let next = query({ after: state.lastSeq, limit: 500 });
  for (let pages = 0; next && pages < 10; pages++) {
    const { status, data } = await api("GET", next);
    showCallsError(status, data);
    if (status !== 200) return;
    const body = $("calls-body");
    for (const r of data.records) {
      if (state.task) body.append(callRow(r, true));
      else body.prepend(callRow(r, true));
    }
    if (data.tail) state.lastSeq = data.tail;
    next = data.next;
  }
}

function applyFilters(event) {
  if (event) event.preventDefault();
  const form = $("filters");
  const f = {};
  for (const name of ["task", "workload", "decision", "host", "tool", "since", "until"]) {
    const v = form.elements[name].value.trim();
    if (v) f[name] = v;
  }
  state.filters = f;
  state.task = f.task || null;
  for (const row of document.querySelectorAll("tr.task-row")) {
    row.classList.toggle("selected", row.dataset.task === state.task);
  }
  loadCalls().catch(report);
}

function report(err) {
  if (err && err.message !== "signed out") setStatus(`error: ${err.message || err}`, true);
}

async function refreshPanels() {
  await Promise.all([loadApprovals(), loadToolChanges(), loadTasks()]);
}

async function signOut() {
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin",
                              headers: { "X-CSRF-Token": CSRF } });
  location.assign("/ui");
}

function start() {
  $("approver").value = localStorage.getItem("taskgate.approver") || "";
  $("filters").addEventListener("submit", applyFilters);
  $("clear").addEventListener("click", () => { $("filters").reset(); applyFilters(); });
  $("older").addEventListener("click", () => loadOlder().catch(report));
  $("signout").addEventListener("click", () => signOut().catch(report));
  refreshPanels().then(() => loadCalls()).then(() => setStatus("up to date")).catch(report);
  setInterval(() => {
    if ($("live").checked) {
      tail().then(() => setStatus(`live · ${new Date().toISOString().slice(11, 19)}Z`)).catch(report);
    }
  }, TAIL_MS);
  setInterval(() => refreshPanels().catch(report), PANELS_MS);
}

start();
