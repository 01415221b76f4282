// The bellaq dashboard: reads and steers bellaq through its JSON API with the key the visitor gives,
// kept in sessionStorage and sent only as "Authorization: Bearer".
// Everything the API returns is written as text (textContent, Text nodes), never parsed as HTML:
// batch metadata and task data are whatever a client sent.
"use strict";

(() => {
  const ROOT = document.body.dataset.apiRoot || "";
  const KEY_ITEM = "bellaq.dashboard.key";
  const WATCH_ITEM = "bellaq.dashboard.watch";
  const FINAL = new Set(["completed", "failed", "expired", "cancelled"]);
  const STATUSES = new Set([...FINAL, "validating", "in_progress", "finalizing", "cancelling"]);
  const CANCELLABLE = new Set(["validating", "in_progress"]);
  const QUEUES_EVERY_MS = 2000;
  const BATCHES_EVERY_MS = 5000;
  const BATCH_POLL_MS = 1000;
  const LIMITS_TTL_MS = 30000;
  const RATE_WINDOW_MS = 60000;
  const PAGE_SIZE = 20;
  // A browser keeps about six connections per host: leave most of them to the API calls.
  const MAX_STREAMS = 3;
  const QUEUE_RE = /^[A-Za-z0-9_-]{1,64}(:[0-9])?$/;

  const $ = (id) => document.getElementById(id);

  const state = {
    key: null,
    role: null,
    generation: 0, // bumped when the key changes: older loops, streams and answers are dropped
    batches: new Map(), // id -> latest Batch object seen
    pageIds: [],
    followers: new Map(), // id -> AbortController of the stream or poll following that batch
    streams: 0,
    cursors: [], // "after" of each newer page, to go back
    after: null,
    hasMore: false,
    rates: new Map(), // "queue:level" -> [[time, done + failed], ...]
    limits: new Map(), // queue name -> {at, value}
    watched: [],
  };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // ------------------------------------------------------------------------------------ helpers

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "dataset") Object.assign(node.dataset, value);
      else node[name] = value;
    }
    node.append(...children.map((c) => (c == null ? "" : c)));
    return node;
  }

  function notice(text, kind = "error") {
    const box = $("notice");
    box.textContent = text;
    box.className = text ? kind : "";
  }

  const sleep = (ms, signal) =>
    new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
    });

  const pad = (n) => String(n).padStart(2, "0");

  function fmtTime(seconds) {
    if (typeof seconds !== "number") return "";
    const d = new Date(seconds * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtAge(ms) {
    if (typeof ms !== "number" || ms <= 0) return "";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  const num = (v) => (typeof v === "number" ? String(v) : "");

  // ---------------------------------------------------------------------------------------- API

  function authHeaders(accept) {
    return { Authorization: `Bearer ${state.key}`, Accept: accept };
  }

  async function call(method, path, { signal, raw = false } = {}) {
    const resp = await fetch(ROOT + path, {
      method, headers: authHeaders("application/json"), cache: "no-store", signal,
    });
    if (raw && resp.ok) return resp;
    let body = null;
    try {
      body = await resp.json();
    } catch {
      body = null;
    }
    if (!resp.ok) {
      const err = body && body.error;
      throw new ApiError(resp.status, err && typeof err.message === "string" ? err.message : `HTTP ${resp.status}`);
    }
    return body;
  }

  // Keep table rows in place (keyed), so a bar can move and a button under the pointer stays put.
  function syncRows(tbody, items, keyOf, build, update) {
    const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
    items.forEach((item, index) => {
      const key = keyOf(item);
      let tr = old.get(key);
      old.delete(key);
      if (!tr) {
        tr = build(item);
        tr.dataset.key = key;
      }
      update(tr, item);
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
    });
    old.forEach((tr) => tr.remove());
  }

  // ------------------------------------------------------------------------------------- queues

  function loadWatched() {
    try {
      const list = JSON.parse(sessionStorage.getItem(WATCH_ITEM) || "[]");
      return Array.isArray(list) ? list.filter((q) => typeof q === "string" && QUEUE_RE.test(q)) : [];
    } catch {
      return [];
    }
  }

  function watch(name) {
    const levels = name.includes(":") ? [name] : [`${name}:0`, `${name}:1`];
    state.watched = [...new Set([...state.watched, ...levels])];
    sessionStorage.setItem(WATCH_ITEM, JSON.stringify(state.watched));
  }

  function unwatch(full) {
    state.watched = state.watched.filter((q) => q !== full);
    sessionStorage.setItem(WATCH_ITEM, JSON.stringify(state.watched));
  }

  async function queueStats() {
    if (state.role === "admin") return (await call("GET", "/v1/console/queue/stats")).data;
    return Promise.all(state.watched.map(async (full) => {
      try {
        return await call("GET", `/v1/queue/${encodeURIComponent(full)}/stats`);
      } catch (err) {
        if (err.status === 401) throw err;
        return { queue: full, error: err.message };
      }
    }));
  }

  // Done per minute over the last minute, from successive done + failed counts.
  function rate(full, row, now) {
    const samples = state.rates.get(full) || [];
    const count = (row.done || 0) + (row.failed || 0);
    if (samples.length && count < samples[samples.length - 1][1]) samples.length = 0; // counters reset
    samples.push([now, count]);
    while (samples.length > 2 && now - samples[1][0] >= RATE_WINDOW_MS) samples.shift();
    state.rates.set(full, samples);
    const [t0, c0] = samples[0];
    if (now - t0 < 1500) return "";
    return String(Math.round(((count - c0) * 60000) / (now - t0)));
  }

  function limits(name) {
    const known = state.limits.get(name);
    if (!known || Date.now() - known.at > LIMITS_TTL_MS) {
      state.limits.set(name, { at: Date.now(), value: known ? known.value : null });
      const gen = state.generation;
      call("GET", `/v1/queue/${encodeURIComponent(name)}/metadata`)
        .then((meta) => {
          const parts = ["rpm", "tpm", "max_in_flight"]
            .filter((f) => typeof meta[f] === "number")
            .map((f) => `${f} ${meta[f]}`);
          if (gen !== state.generation) return;
          state.limits.set(name, { at: Date.now(), value: parts.join(" · ") || "none" });
          for (const tr of $("queue-rows").children) {
            if (tr.firstChild.textContent === name) tr.children[7].textContent = state.limits.get(name).value;
          }
        })
        .catch(() => {});
    }
    return known ? known.value : null;
  }

  async function refreshQueues(gen) {
    const rows = await queueStats();
    if (gen !== state.generation) return;
    const now = Date.now();
    const delayed = rows.some((r) => typeof r.delayed === "number");
    document.querySelectorAll(".delayed-col").forEach((c) => { c.hidden = !delayed; });
    syncRows($("queue-rows"), rows, (r) => r.queue, buildQueueRow, (tr, r) => {
      const [name, level] = String(r.queue).split(":");
      const cells = tr.children;
      cells[0].textContent = name;
      cells[1].textContent = level || "";
      if (r.error) {
        for (let i = 2; i < 8; i++) cells[i].textContent = "";
        cells[7].textContent = r.error;
        return;
      }
      cells[2].textContent = num(r.waiting);
      cells[3].textContent = num(r.running);
      cells[4].textContent = num(r.delayed);
      cells[4].hidden = !delayed;
      cells[5].textContent = r.waiting ? fmtAge(r.oldest_age_ms) : "";
      cells[6].textContent = rate(r.queue, r, now);
      cells[7].textContent = limits(name) || "";
    });
  }

  function buildQueueRow(r) {
    const full = String(r.queue);
    const action = state.role === "admin"
      ? el("button", { type: "button", className: "danger", onclick: () => clearLevel(full) }, "Clear")
      : el("button", { type: "button", onclick: () => { unwatch(full); kick(); } }, "Unwatch");
    return el("tr", {},
      el("td", { className: "queue-name" }), el("td"), el("td", { className: "num" }), el("td", { className: "num" }),
      el("td", { className: "num delayed-col", hidden: true }), el("td", { className: "num" }),
      el("td", { className: "num" }), el("td", { className: "limits" }), el("td", {}, action));
  }

  async function clearLevel(full) {
    if (!window.confirm(`Cancel every waiting task of ${full}? Running tasks go on.`)) return;
    try {
      const out = await call("POST", `/v1/console/${encodeURIComponent(full)}/clear`);
      notice(`Cleared ${out.cleared} waiting task(s) of ${out.queue}.`, "info");
    } catch (err) {
      notice(`Could not clear ${full}: ${err.message}`);
    }
    kick();
  }

  // ------------------------------------------------------------------------------------ batches

  async function refreshBatches(gen) {
    const query = `limit=${PAGE_SIZE}` + (state.after ? `&after=${encodeURIComponent(state.after)}` : "");
    const page = await call("GET", `/v1/batches?${query}`);
    if (gen !== state.generation) return;
    state.pageIds = page.data.map((b) => b.id);
    state.hasMore = Boolean(page.has_more);
    for (const b of page.data) {
      // A batch being followed is fresher from its stream or poll than from this list.
      if (!state.followers.has(b.id) || !state.batches.has(b.id)) state.batches.set(b.id, b);
    }
    for (const [id, ctl] of state.followers) if (!state.pageIds.includes(id)) ctl.abort();
    renderBatches();
    for (const b of page.data) if (!FINAL.has(b.status) && !state.followers.has(b.id)) follow(b.id, gen);
    $("page-newer").disabled = state.cursors.length === 0;
    $("page-older").disabled = !state.hasMore;
  }

  function renderBatches() {
    const rows = state.pageIds.map((id) => state.batches.get(id)).filter(Boolean);
    syncRows($("batch-rows"), rows, (b) => b.id, buildBatchRow, updateBatchRow);
  }

  function buildBatchRow(b) {
    return el("tr", {},
      el("td", {}, el("code", { className: "batch-id" }, b.id), el("div", { className: "meta" })),
      el("td", {}, el("span", { className: "status" })),
      el("td", {},
        el("div", { className: "bar" }, el("span", { className: "ok" }), el("span", { className: "bad" })),
        el("div", { className: "counts" })),
      el("td", { className: "time" }), el("td", { className: "time" }), el("td", { className: "files" }),
      el("td", { className: "actions" }));
  }

  function updateBatchRow(tr, b) {
    const counts = b.request_counts || {};
    const total = counts.total || 0;
    const done = counts.completed || 0;
    const failed = counts.failed || 0;
    const [idCell, statusCell, progressCell, createdCell, finishedCell, filesCell, actionsCell] = tr.children;
    const meta = b.metadata && typeof b.metadata === "object" ? b.metadata : {};
    idCell.lastChild.textContent = Object.entries(meta).map(([k, v]) => `${k}=${v}`).join("  ");
    const status = statusCell.firstChild;
    status.textContent = b.status;
    status.className = `status status-${STATUSES.has(b.status) ? b.status : "other"}`;
    const [ok, bad] = progressCell.firstChild.children;
    ok.style.width = total ? `${(100 * done) / total}%` : "0%";
    bad.style.width = total ? `${(100 * failed) / total}%` : "0%";
    progressCell.lastChild.textContent = `${done} ok · ${failed} failed / ${total}`;
    Object.assign(tr.dataset, { status: b.status, completed: done, failed, total });
    createdCell.textContent = fmtTime(b.created_at);
    finishedCell.textContent = fmtTime(b.completed_at ?? b.failed_at ?? b.expired_at ?? b.cancelled_at);
    const files = [];
    if (b.output_file_id) files.push(downloadButton(b.output_file_id, `${b.id}_output.jsonl`, "output"));
    if (b.error_file_id) files.push(downloadButton(b.error_file_id, `${b.id}_error.jsonl`, "errors"));
    if (filesCell.dataset.ids !== `${b.output_file_id}|${b.error_file_id}`) {
      filesCell.dataset.ids = `${b.output_file_id}|${b.error_file_id}`;
      filesCell.replaceChildren(...files);
    }
    const cancellable = CANCELLABLE.has(b.status);
    if (cancellable !== Boolean(actionsCell.firstChild)) {
      actionsCell.replaceChildren(...(cancellable
        ? [el("button", { type: "button", className: "danger cancel", onclick: () => cancelBatch(b.id) }, "Cancel")]
        : []));
    }
  }

  function updateBatch(obj) {
    const known = state.batches.get(obj.id) || {};
    state.batches.set(obj.id, { ...known, ...obj });
    renderBatches();
  }

  function downloadButton(fileId, name, label) {
    const button = el("button", { type: "button", className: "link" }, label);
    button.onclick = () => download(fileId, name.replace(/[^A-Za-z0-9._-]/g, "_"), button);
    return button;
  }

  // A plain link cannot carry the key: fetch with it and save the bytes through a Blob URL.
  async function download(fileId, name, button) {
    button.disabled = true;
    try {
      const resp = await call("GET", `/v1/files/${encodeURIComponent(fileId)}/content`, { raw: true });
      const url = URL.createObjectURL(await resp.blob());
      const link = el("a", { href: url, download: name, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) {
      notice(`Could not download ${name}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  async function cancelBatch(id) {
    if (!window.confirm(`Cancel batch ${id}? Finished results are kept.`)) return;
    try {
      updateBatch(await call("POST", `/v1/batches/${encodeURIComponent(id)}/cancel`));
      if (!state.followers.has(id)) follow(id, state.generation);
    } catch (err) {
      notice(`Could not cancel ${id}: ${err.message}`);
    }
  }

  // Follow a running batch: its event stream if there is one, else poll it, until it ends.
  async function follow(id, gen) {
    const ctl = new AbortController();
    state.followers.set(id, ctl);
    try {
      let ended = false;
      if (state.streams < MAX_STREAMS) {
        state.streams += 1;
        try {
          ended = await stream(id, ctl.signal, gen);
        } finally {
          state.streams -= 1;
        }
      }
      if (!ended) await poll(id, ctl.signal, gen);
    } catch (err) {
      if (!ctl.signal.aborted && gen === state.generation && err.status !== 404) notice(err.message);
    } finally {
      if (state.followers.get(id) === ctl) state.followers.delete(id);
    }
  }

  // Read GET /v1/batches/{id}/events with fetch (EventSource cannot send the key). Returns whether
  // the batch ended; false when the stream is not served or closed early, so the caller polls.
  async function stream(id, signal, gen) {
    let resp;
    try {
      resp = await fetch(`${ROOT}/v1/batches/${encodeURIComponent(id)}/events`, {
        headers: authHeaders("text/event-stream"), cache: "no-store", signal,
      });
    } catch {
      return false;
    }
    const type = resp.headers.get("Content-Type") || "";
    if (!resp.ok || !type.startsWith("text/event-stream") || !resp.body) {
      if (resp.body) resp.body.cancel().catch(() => {});
      return false;
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || gen !== state.generation) return false;
        buffer = (buffer + value).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event || event.id !== id) continue;
          updateBatch(event);
          if (FINAL.has(event.status)) return true;
        }
      }
    } catch {
      return false;
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function parseEvent(block) {
    const data = block.split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) return null; // a comment (keep-alive) or an event without data
    try {
      const obj = JSON.parse(data);
      return obj && typeof obj === "object" && typeof obj.id === "string" ? obj : null;
    } catch {
      return null;
    }
  }

  async function poll(id, signal, gen) {
    while (!signal.aborted && gen === state.generation) {
      const batch = await call("GET", `/v1/batches/${encodeURIComponent(id)}`, { signal });
      if (gen !== state.generation) return;
      updateBatch(batch);
      if (FINAL.has(batch.status)) return;
      await sleep(BATCH_POLL_MS, signal);
    }
  }

  // --------------------------------------------------------------------------------------- tasks

  async function lookUp(id) {
    const view = $("task-view");
    view.textContent = "";
    view.className = "";
    try {
      const task = await call("GET", `/v1/queue/${encodeURIComponent(id)}`);
      view.textContent = JSON.stringify(task, null, 2);
      if (state.role !== "admin" && typeof task.queue === "string" && QUEUE_RE.test(`${task.queue}:${task.level}`)) {
        watch(`${task.queue}:${task.level}`);
        kick();
      }
    } catch (err) {
      view.className = "error";
      view.textContent = err.message;
    }
  }

  // ------------------------------------------------------------------------------- key and loops

  const loops = { queues: refreshQueues, batches: refreshBatches };
  const loopTimers = {};

  function run(name, gen) {
    clearTimeout(loopTimers[name]);
    loops[name](gen)
      .catch((err) => {
        if (gen !== state.generation) return;
        if (err.status === 401) signOut("This key is no longer accepted; enter another.");
        else notice(err.message);
      })
      .finally(() => {
        if (gen === state.generation) {
          clearTimeout(loopTimers[name]); // a kick may have run this loop meanwhile: keep one timer
          loopTimers[name] = setTimeout(() => run(name, gen), name === "queues" ? QUEUES_EVERY_MS : BATCHES_EVERY_MS);
        }
      });
  }

  // Refresh everything now (after an action), keeping the loops' rhythm afterwards.
  function kick() {
    for (const name of Object.keys(loops)) run(name, state.generation);
  }

  async function role() {
    try {
      await call("GET", "/v1/console/queue/stats");
      return "admin";
    } catch (err) {
      if (err.status !== 403) throw err;
    }
    await call("GET", "/v1/batches?limit=1"); // a worker key gets 403 here
    return "user";
  }

  async function useKey(key) {
    state.key = key;
    const gen = ++state.generation;
    let found;
    try {
      found = await role();
    } catch (err) {
      if (gen !== state.generation) return;
      if (err.status === 401 || err.status === 403) {
        signOut(err.status === 401 ? "That key is not accepted." : "This dashboard needs a user or admin key.");
      } else {
        notice(`Cannot reach bellaq (${err.message}); retrying.`);
        setTimeout(() => { if (gen === state.generation) useKey(key); }, 3000);
      }
      return;
    }
    if (gen !== state.generation) return;
    sessionStorage.setItem(KEY_ITEM, key);
    state.role = found;
    notice("");
    $("key-form").hidden = true;
    $("key-state").hidden = false;
    $("key-role").textContent = `${found} key`;
    $("panels").hidden = false;
    $("watch-form").hidden = found === "admin";
    $("queues-note").textContent = found === "admin"
      ? "Every queue and level."
      : "Queue totals need an admin key: watch the queues your work runs on.";
    kick();
  }

  function signOut(message = "") {
    state.generation += 1;
    for (const ctl of state.followers.values()) ctl.abort();
    Object.values(loopTimers).forEach(clearTimeout);
    sessionStorage.removeItem(KEY_ITEM);
    Object.assign(state, { key: null, role: null, pageIds: [], cursors: [], after: null });
    state.batches.clear();
    state.followers.clear();
    state.rates.clear();
    state.limits.clear();
    $("queue-rows").replaceChildren();
    $("batch-rows").replaceChildren();
    $("task-view").textContent = "";
    $("panels").hidden = true;
    $("key-state").hidden = true;
    $("key-form").hidden = false;
    notice(message);
  }

  function onSubmit(id, handler) {
    $(id).addEventListener("submit", (event) => {
      event.preventDefault();
      handler();
    });
  }

  onSubmit("key-form", () => {
    const key = $("key-input").value.trim();
    $("key-input").value = "";
    if (key) useKey(key);
  });
  onSubmit("watch-form", () => {
    const name = $("watch-input").value.trim();
    if (!QUEUE_RE.test(name)) {
      notice("A queue is written name or name:level, with A-Z, a-z, 0-9, '_' and '-'.");
      return;
    }
    $("watch-input").value = "";
    watch(name);
    kick();
  });
  onSubmit("task-form", () => {
    const id = $("task-input").value.trim();
    if (id) lookUp(id);
  });
  $("key-forget").addEventListener("click", () => signOut());
  $("page-older").addEventListener("click", () => {
    state.cursors.push(state.after);
    state.after = state.pageIds[state.pageIds.length - 1] || null;
    run("batches", state.generation);
  });
  $("page-newer").addEventListener("click", () => {
    state.after = state.cursors.pop() || null;
    run("batches", state.generation);
  });

  state.watched = loadWatched();
  const saved = sessionStorage.getItem(KEY_ITEM);
  if (saved) useKey(saved);
})();
