// StreamHarness live view: vanilla JS, no build step, nothing from outside this gateway.
// The API key stays in sessionStorage and goes as "Authorization: Bearer <key>" on every call;
// EventSource cannot send headers, so the SSE streams are read with fetch + ReadableStream.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "streamharness.apiKey";
const FRAME_EVERY_MS = 1000;

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  stream: "",
  abort: null,          // AbortController of the current stream's event reader
  frameTimer: null,
  frameUrl: null,
  minutes: new Map(),   // minute index -> row element
  seconds: new Map(),   // media second -> {cell, decisions: []}
  responses: new Map(), // response_id -> {el, next, text}
  questions: new Map(), // question_id -> {text, el}
  instructions: new Map(), // instruction_id -> text
  decided: 0,
};

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const res = await fetch(path, opts);
  if (!res.ok) {
    let message = res.status + " " + res.statusText;
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON */ }
    const err = new Error(message);
    err.status = res.status;
    throw err;
  }
  return res;
}

function fmt(ms) {
  if (ms === undefined || ms === null || ms < 0) return "–";
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + kind;
}

function say(text, isError) {
  const el = $("form-message");
  el.textContent = text || "";
  el.className = isError ? "error" : "";
}

// -- streams ---------------------------------------------------------------------------------------
async function loadStreams() {
  const select = $("stream");
  let streams = [];
  try {
    streams = (await (await api("/v1/streams")).json()).data || [];
  } catch (err) {
    select.innerHTML = "";
    select.append(new Option(err.status === 401 ? "enter an API key" : "cannot list streams", ""));
    setStatus(err.message, "error");
    return;
  }
  const wanted = state.stream || new URLSearchParams(location.search).get("stream") || "";
  select.innerHTML = "";
  if (!streams.length) select.append(new Option("no open streams", ""));
  for (const st of streams) {
    const label = st.stream_id + (st.source ? ` · ${st.source}` : "");
    select.append(new Option(label, st.stream_id));
  }
  const pick = streams.find((st) => st.stream_id === wanted) || streams[0];
  if (pick) {
    select.value = pick.stream_id;
    if (pick.stream_id !== state.stream) selectStream(pick.stream_id);
  } else {
    setStatus("no open streams", "idle");
  }
}

function resetView() {
  state.minutes.clear();
  state.seconds.clear();
  state.responses.clear();
  state.questions.clear();
  state.instructions.clear();
  state.decided = 0;
  $("timeline").innerHTML = "";
  $("responses").innerHTML = '<li class="empty">Proactive alerts and answers appear here as they stream.</li>';
  $("instructions").innerHTML = "";
  $("decision-count").textContent = "";
  $("response-count").textContent = "";
  $("session-id").textContent = "";
  $("source-status").hidden = true;
  $("media-time").textContent = "–";
  showFrame(null);
}

function selectStream(streamId) {
  if (state.abort) state.abort.abort();
  clearInterval(state.frameTimer);
  state.stream = streamId;
  resetView();
  if (!streamId) return;
  const url = new URL(location.href);
  url.searchParams.set("stream", streamId);
  history.replaceState(null, "", url);
  state.abort = new AbortController();
  readEvents(streamId, state.abort.signal);
  refreshFrame();
  state.frameTimer = setInterval(refreshFrame, FRAME_EVERY_MS);
}

// -- the latest frame ------------------------------------------------------------------------------
let frameBusy = false;
async function refreshFrame() {
  if (frameBusy || !state.stream) return;
  frameBusy = true;
  const stream = state.stream;
  try {
    const res = await fetch(`/v1/streams/${encodeURIComponent(stream)}/frame.jpg`, { headers: headers(), cache: "no-store" });
    if (stream !== state.stream) return;
    if (res.status === 404) { showFrame(null); return; }
    if (!res.ok) return;
    const blob = await res.blob();
    showFrame(URL.createObjectURL(blob));
    const ts = Number(res.headers.get("X-Media-Ts-Ms"));
    if (!Number.isNaN(ts)) $("media-time").textContent = fmt(ts);
  } catch (_) {
    /* the next tick tries again */
  } finally {
    frameBusy = false;
  }
}

function showFrame(url) {
  const img = $("frame");
  if (state.frameUrl) URL.revokeObjectURL(state.frameUrl);
  state.frameUrl = url;
  if (url) {
    img.src = url;
    img.hidden = false;
    $("no-frame").hidden = true;
  } else {
    img.removeAttribute("src");
    img.hidden = true;
    $("no-frame").hidden = false;
  }
}

// -- server-sent events, read with fetch -------------------------------------------------------------
async function readEvents(streamId, signal) {
  let backoff = 1000;
  while (!signal.aborted) {
    try {
      const res = await api(`/v1/streams/${encodeURIComponent(streamId)}/events`, { signal, headers: { Accept: "text/event-stream" } });
      setStatus("live", "live");
      backoff = 1000;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const ev = parseEvent(block);
          if (ev) onEvent(ev.event, ev.data);
        }
      }
      if (!signal.aborted) setStatus("reconnecting…", "idle");
    } catch (err) {
      if (signal.aborted) return;
      setStatus(err.message || "disconnected", "error");
      if (err.status === 401 || err.status === 404) return;
    }
    await new Promise((r) => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try {
    return { event, data: JSON.parse(data.join("\n")) };
  } catch (_) {
    return null;
  }
}

function onEvent(kind, data) {
  if (kind === "decision") onDecision(data);
  else if (kind === "response") onResponse(data);
  else if (kind === "source") onSource(data);
  else if (kind === "stream") onStream(data);
}

function onStream(info) {
  $("session-id").textContent = info ? `session ${info.session_id.slice(0, 8)}…` : "no session on this replica";
  if (info && info.last_media_ts_ms >= 0) $("media-time").textContent = fmt(info.last_media_ts_ms);
}

function onSource(s) {
  const el = $("source-status");
  el.hidden = false;
  el.className = "source " + s.kind;
  const extra = s.kind === "gap" ? ` ${Math.round(s.gap_ms / 1000)} s` : s.kind === "reconnecting" ? ` (attempt ${s.attempt})` : "";
  el.textContent = s.kind + extra;
  el.title = s.message || s.url || "";
}

// -- the timeline: one row per minute, one cell per second ------------------------------------------------
function minuteRow(minute) {
  let row = state.minutes.get(minute);
  if (row) return row;
  row = document.createElement("div");
  row.className = "minute";
  row.dataset.minute = minute;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = fmt(minute * 60000);
  row.append(label);
  for (let s = 0; s < 60; s++) {
    const cell = document.createElement("i");
    cell.className = "cell" + (s % 10 === 0 && s ? " tick" : "");
    cell.dataset.second = minute * 60 + s;
    row.append(cell);
  }
  // Rows in media-time order (a late decision of an earlier minute goes where it belongs).
  const timeline = $("timeline");
  const after = [...state.minutes.keys()].filter((m) => m > minute).sort((a, b) => a - b)[0];
  timeline.insertBefore(row, after === undefined ? null : state.minutes.get(after));
  state.minutes.set(minute, row);
  return row;
}

function slotAt(mediaTs) {
  const second = Math.floor(mediaTs / 1000);
  let slot = state.seconds.get(second);
  if (!slot) {
    const row = minuteRow(Math.floor(second / 60));
    slot = { second, cell: row.children[1 + (second % 60)], decisions: [], responses: [] };
    state.seconds.set(second, slot);
  }
  return slot;
}

function onDecision(d) {
  if (d.instruction_id && d.prompt_text && !state.instructions.has(d.instruction_id)) {
    watching({ instruction_id: d.instruction_id }, d.prompt_text, true); // a standing instruction of the session's client
  }
  const slot = slotAt(d.media_ts_ms);
  if (slot.decisions.some((x) => x.media_ts_ms === d.media_ts_ms && x.respond === d.respond
      && x.question_id === d.question_id && x.instruction_id === d.instruction_id)) return; // a redelivery
  slot.decisions.push(d);
  state.decided += 1;
  $("decision-count").textContent = `${state.decided} decided`;
  paint(slot);
  const timeline = $("timeline");
  if (timeline.scrollHeight - timeline.scrollTop - timeline.clientHeight < 40) timeline.scrollTop = timeline.scrollHeight;
}

// A second shows its most telling event: a question answered, else an instruction's alert, else
// silence. A response counts as its second's decision to respond (it carries that decision's time).
function paint(slot) {
  const responds = [
    ...slot.decisions.filter((x) => x.respond).map((x) => ({ q: x.question_id, i: x.instruction_id, question: x.trigger === "question" })),
    ...slot.responses.map((r) => ({ q: r.questionId, i: r.instructionId, question: !!r.questionId })),
  ];
  const cell = slot.cell;
  const tick = slot.second % 10 === 0 && slot.second % 60 ? " tick" : "";
  if (!slot.decisions.length && !responds.length) return;
  const shown = responds.find((x) => x.question) || responds[0];
  cell.className = "cell decided " + (shown ? "respond " + (shown.question ? "question" : "instruction") : "silent") + tick;
  const question = responds.find((x) => x.q);
  const instruction = responds.find((x) => x.i);
  if (question) cell.dataset.questionId = question.q;
  if (instruction) cell.dataset.instructionId = instruction.i;
  cell.dataset.mediaTsMs = slot.second * 1000;
  if (slot.responses.some((r) => r.final)) cell.classList.add("answered");
  cell.setAttribute("aria-label", describe(slot));
}

function describe(slot) {
  const parts = slot.decisions.map((d) => {
    const what = d.respond
      ? `respond · ${d.trigger === "question" ? "question" : "instruction"} ${d.question_id || d.instruction_id || ""}`
      : "silent";
    const lines = [`${fmt(d.media_ts_ms)}  ${what}`];
    const prompt = d.prompt_text || state.questions.get(d.question_id)?.text || state.instructions.get(d.instruction_id);
    if (prompt) lines.push(`“${prompt}”`);
    if (d.reason) lines.push(d.reason);
    if (d.policy || d.score) lines.push(`${d.policy || "policy"} · score ${Number(d.score).toFixed(2)}`);
    return lines.join("\n");
  });
  for (const r of slot.responses) {
    const prompt = r.questionId ? state.questions.get(r.questionId)?.text : state.instructions.get(r.instructionId);
    const text = r.text.length > 140 ? r.text.slice(0, 140) + "…" : r.text;
    parts.push(`${fmt(r.mediaTs)}  ${r.questionId ? "answer" : "alert"}${prompt ? ` to “${prompt}”` : ""}\n${text}`);
  }
  return parts.join("\n\n");
}

function markResponse(r) {
  const slot = slotAt(r.mediaTs);
  if (!slot.responses.includes(r)) slot.responses.push(r);
  paint(slot);
}

// -- responses ---------------------------------------------------------------------------------------
function card(c) {
  let r = state.responses.get(c.response_id);
  if (r) return r;
  const asked = c.question_id ? state.questions.get(c.question_id) : null;
  let el = asked && asked.el && !asked.el.dataset.responseId ? asked.el : null;
  if (!el) {
    el = document.createElement("li");
    el.innerHTML = '<div class="head"><span class="badge"></span><span class="when"></span></div><div class="prompt"></div><div class="text"></div>';
    prependResponse(el);
  }
  el.className = "response " + (c.question_id ? "question" : "instruction");
  el.dataset.responseId = c.response_id;
  if (c.question_id) el.dataset.questionId = c.question_id;
  if (c.instruction_id) el.dataset.instructionId = c.instruction_id;
  el.querySelector(".badge").textContent = c.question_id ? "answer" : "alert";
  el.querySelector(".when").textContent = "at " + fmt(c.media_ts_ms);
  const prompt = c.question_id ? asked?.text : state.instructions.get(c.instruction_id) || (c.instruction_id && `standing instruction “${c.instruction_id}”`);
  el.querySelector(".prompt").textContent = prompt || "";
  r = { el, next: 0, text: "", final: false, mediaTs: c.media_ts_ms, questionId: c.question_id, instructionId: c.instruction_id };
  state.responses.set(c.response_id, r);
  $("response-count").textContent = `${state.responses.size}`;
  return r;
}

function prependResponse(el) {
  const list = $("responses");
  const empty = list.querySelector(".empty");
  if (empty) empty.remove();
  list.prepend(el);
}

function onResponse(c) {
  const r = card(c);
  // Chunks come as published: a repeat is dropped; index 0 again starts a regenerated answer over.
  if (c.index === 0 && r.next > 0) { r.text = ""; r.next = 0; r.final = false; r.el.classList.remove("final"); }
  if (c.index !== r.next) return;
  r.next += 1;
  r.text += c.text;
  r.el.querySelector(".text").textContent = r.text;
  if (c.refusal) r.el.classList.add("refused");
  if (c.final) {
    r.el.classList.add("final");
    r.final = true;
  }
  markResponse(r);
}

// -- asking and watching -----------------------------------------------------------------------------
async function submit(form, input, path, onDone) {
  const text = input.value.trim();
  if (!text || !state.stream) return;
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const res = await api(`/v1/streams/${encodeURIComponent(state.stream)}/${path}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }),
    });
    onDone(await res.json(), text);
    input.value = "";
  } catch (err) {
    say(err.message, true);
  } finally {
    button.disabled = false;
  }
}

function asked(body, text) {
  const el = document.createElement("li");
  el.className = "response question";
  el.dataset.questionId = body.question_id;
  el.innerHTML = '<div class="head"><span class="badge">question</span><span class="when">waiting for the answer…</span></div><div class="prompt"></div><div class="text"></div>';
  el.querySelector(".prompt").textContent = text;
  prependResponse(el);
  state.questions.set(body.question_id, { text, el });
  say(`asked (${body.question_id})`);
}

function watching(body, text, quiet) {
  state.instructions.set(body.instruction_id, text);
  const chip = document.createElement("li");
  chip.textContent = text;
  chip.title = `standing instruction ${body.instruction_id}`;
  $("instructions").append(chip);
  if (!quiet) say(`watching for it (${body.instruction_id})`);
}

// -- the tooltip ---------------------------------------------------------------------------------------
function tooltip(ev) {
  const tip = $("tooltip");
  const cell = ev.target.closest(".cell.decided");
  if (!cell) { tip.hidden = true; return; }
  const slot = state.seconds.get(Number(cell.dataset.second));
  if (!slot) { tip.hidden = true; return; }
  tip.textContent = describe(slot);
  tip.hidden = false;
  const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = ev.clientY - tip.offsetHeight - 12;
  tip.style.left = x + "px";
  tip.style.top = (y < 4 ? ev.clientY + 18 : y) + "px";
}

function jumpToResponse(ev) {
  const cell = ev.target.closest(".cell.respond");
  if (!cell) return;
  const second = Number(cell.dataset.second);
  for (const r of state.responses.values()) {
    if (Math.floor(r.mediaTs / 1000) === second) {
      r.el.scrollIntoView({ block: "nearest", behavior: "smooth" });
      r.el.classList.add("flash");
      setTimeout(() => r.el.classList.remove("flash"), 1200);
      return;
    }
  }
}

// -- start ---------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("api-key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
    else sessionStorage.removeItem(KEY_STORE);
    state.stream = "";
    loadStreams();
  });
  $("stream").addEventListener("change", (ev) => selectStream(ev.target.value));
  $("refresh").addEventListener("click", loadStreams);
  $("ask-form").addEventListener("submit", (ev) => { ev.preventDefault(); submit(ev.target, $("question"), "questions", asked); });
  $("instruction-form").addEventListener("submit", (ev) => { ev.preventDefault(); submit(ev.target, $("instruction"), "instructions", watching); });
  const timeline = $("timeline");
  timeline.addEventListener("mousemove", tooltip);
  timeline.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  timeline.addEventListener("click", jumpToResponse);
  loadStreams();
  setInterval(() => { if (!state.stream) loadStreams(); }, 3000);
});
