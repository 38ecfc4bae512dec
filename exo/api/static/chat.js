// The chat half of the page: the model list, the conversation (kept in this tab's sessionStorage: each tab has its own, and a
// reload keeps it, an answer cut by the reload marked interrupted) and one streamed completion at a time, all through the node's
// OpenAI-compatible API on this same origin.
"use strict";

// The request settings the API honours, one input each; an empty one is left out of the request (the API's default).
const SETTINGS = [
  { key: "max_tokens", label: "Max tokens", min: 1, step: 1, placeholder: "the node's limit" },
  { key: "temperature", label: "Temperature", min: 0, max: 2, step: "any", placeholder: "0 (greedy)" },
];
const STORE = "exo-chat";

const $ = (id) => document.getElementById(id);
const view = {
  model: $("model"), settings: $("settings"), messages: $("messages"), empty: $("empty"), error: $("error"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
};
let conversation = load();  // {model, settings: {key: text}, messages: [{role, content, state, meta}]}
let running = null;  // the AbortController of the completion streaming now
const elements = new WeakMap();  // message -> its bubble

function load() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE));
    if (saved && Array.isArray(saved.messages)) return { model: saved.model || "", settings: saved.settings || {}, messages: saved.messages };
  } catch (e) { /* no storage, or not ours: start afresh */ }
  return { model: "", settings: {}, messages: [] };
}

function save() {
  try { sessionStorage.setItem(STORE, JSON.stringify(conversation)); } catch (e) { /* no storage: memory only */ }
}

// ---------- errors ----------

function showError(text) {
  view.error.textContent = text;
  view.error.hidden = false;
}

function hideError() {
  view.error.hidden = true;
}

class ApiError extends Error {}

// The API's own sentence for a failed request: {"error": {"message"}} as OpenAI sends it, else the body's text.
async function responseError(response) {
  const text = await response.text();
  let message = text.trim() || response.statusText;
  try { message = JSON.parse(text).error.message || message; } catch (e) { /* not JSON: the text itself */ }
  return new ApiError(`${sentence(message)} (HTTP ${response.status})`);
}

const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1) + (/[.!?]$/.test(text) ? "" : ".");

function unreachable(e) {
  return `Cannot reach the node at ${location.host}: it may be down or restarting (${e.message}).`;
}

// ---------- models and settings ----------

async function loadModels(retried = false) {
  let models;
  try {
    const response = await fetch("v1/models");
    if (!response.ok) throw await responseError(response);
    models = (await response.json()).data;
  } catch (e) {
    showError(`${e instanceof ApiError ? e.message : unreachable(e)} Retrying…`);
    setTimeout(() => loadModels(true), 3000);
    return;
  }
  if (retried) hideError();
  view.model.textContent = "";
  const groups = [["On this node", models.filter((m) => m.present !== false)], ["No model files on this node", models.filter((m) => m.present === false)]];
  for (const [label, list] of groups) {
    if (!list.length) continue;
    const group = document.createElement("optgroup");
    group.label = label;
    for (const m of list) {
      const option = new Option(m.id + (m === models[0] ? " (this node's model)" : ""), m.id);
      option.dataset.present = m.present !== false;
      group.append(option);
    }
    view.model.append(group);
  }
  const ids = models.map((m) => m.id);
  view.model.value = ids.includes(conversation.model) ? conversation.model : ids[0];
  if (models[0] && models[0].max_tokens) $("setting-max_tokens").placeholder = `up to ${models[0].max_tokens} (the node's limit)`;
  noteModel();
}

function noteModel() {
  const option = view.model.selectedOptions[0];
  view.model.classList.toggle("absent", option && option.dataset.present === "false");
  view.model.title = option && option.dataset.present === "false" ? "This node has no files for this model: a request for it will fail." : "";
}

function buildSettings() {
  for (const s of SETTINGS) {
    const label = document.createElement("label");
    label.className = "field";
    const input = document.createElement("input");
    Object.assign(input, { type: "number", id: `setting-${s.key}`, min: s.min, step: s.step, placeholder: s.placeholder });
    if (s.max !== undefined) input.max = s.max;
    input.value = conversation.settings[s.key] || "";
    input.addEventListener("change", () => { conversation.settings[s.key] = input.value; save(); });
    label.append(`${s.label} `, input);
    view.settings.append(label);
  }
}

// The settings to send: the filled-in ones, as numbers; an invalid one throws a sentence naming it.
function settingsBody() {
  const body = {};
  for (const s of SETTINGS) {
    const input = $(`setting-${s.key}`);
    if (input.value === "") continue;
    if (!input.checkValidity()) {
      const range = s.max === undefined ? `of at least ${s.min}` : `from ${s.min} to ${s.max}`;
      throw new ApiError(`${s.label} must be a number${s.step === 1 ? " (a whole one)" : ""} ${range}, got "${input.value}".`);
    }
    body[s.key] = Number(input.value);
  }
  return body;
}

// ---------- the conversation ----------

function bubble(message) {
  const item = document.createElement("div");
  item.className = `msg ${message.role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = message.role === "user" ? "You" : message.model || "assistant";
  const text = document.createElement("div");
  text.className = "text";
  const meta = document.createElement("div");
  meta.className = "meta";
  item.append(who, text, meta);
  view.messages.append(item);
  elements.set(message, item);
  paint(message);
  return item;
}

function paint(message) {
  const item = elements.get(message);
  item.dataset.state = message.state || "done";
  item.querySelector(".text").textContent = message.content || (message.state === "streaming" ? "…" : "");
  item.querySelector(".meta").textContent = message.meta || "";
  item.title = message.error || "";
}

function renderAll() {
  view.messages.querySelectorAll(".msg").forEach((e) => e.remove());
  view.empty.hidden = conversation.messages.length > 0;
  conversation.messages.forEach(bubble);
  scrollDown();
}

function scrollDown() {
  view.messages.scrollTop = view.messages.scrollHeight;
}

function setBusy(busy) {
  view.send.disabled = busy;
  view.stop.disabled = !busy;
  view.model.disabled = busy;
}

// What the model is sent: every exchange that got an answer; one that failed or was stopped before its first word stays on the
// page but is not resent.
function history() {
  const list = conversation.messages;
  const answered = (m, i) => {
    const answer = m.role === "user" ? list[i + 1] : m;
    return !answer || answer.role !== "assistant" || (Boolean(answer.content) && answer.state !== "failed");
  };
  return list.filter(answered).map((m) => ({ role: m.role, content: m.content }));
}

async function send(text) {
  hideError();
  let settings;
  try { settings = settingsBody(); } catch (e) { showError(e.message); return; }
  const model = view.model.value;
  if (!model) { showError("No model to ask yet: the model list has not loaded from the node."); return; }
  conversation.model = model;
  const question = { role: "user", content: text, state: "done" };
  const reply = { role: "assistant", content: "", model, state: "streaming", meta: "" };
  conversation.messages.push(question);
  const messages = history();
  conversation.messages.push(reply);
  view.empty.hidden = true;
  bubble(question);
  bubble(reply);
  save();  // a reload from now on keeps the question, and the answer as far as it came
  scrollDown();
  const controller = (running = new AbortController());
  setBusy(true);
  const started = performance.now();
  let finish = null, usage = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...settings }),
      signal: controller.signal,
    });
    if (!response.ok) throw await responseError(response);
    for await (const event of serverEvents(response.body)) {
      if (event.error) throw new ApiError(sentence(event.error.message));
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply.content += choice.delta.content;
        paint(reply);
        save();
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    reply.state = "done";
    reply.meta = [tokens === null ? null : `${tokens} tokens`, `${seconds.toFixed(1)} s`, tokens ? `${(tokens / seconds).toFixed(1)} tokens/s` : null,
      finish === "length" ? "cut at the token limit" : null].filter(Boolean).join(" · ");
  } catch (e) {
    if (e.name === "AbortError") {
      reply.state = "stopped";
      reply.meta = reply.content ? "stopped" : "stopped before the first word";
    } else {
      const message = e instanceof ApiError ? e.message : unreachable(e);
      Object.assign(reply, { state: "failed", meta: "No answer (hover here for the reason).", error: message });
      showError(message);
    }
  } finally {
    if (running === controller) running = null;
    setBusy(running !== null);
    paint(reply);
    save();
    scrollDown();
  }
}

// The JSON payloads of a server-sent event stream, until [DONE].
async function* serverEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function newChat() {
  if (running) running.abort();
  conversation.messages = [];
  hideError();
  save();
  renderAll();
  view.prompt.focus();
}

view.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = view.prompt.value.trim();
  if (!text || running) return;
  view.prompt.value = "";
  send(text);
});
view.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    view.composer.requestSubmit();
  }
});
view.stop.addEventListener("click", () => running && running.abort());
view.newChat.addEventListener("click", newChat);
view.model.addEventListener("change", () => { conversation.model = view.model.value; noteModel(); save(); });

for (const m of conversation.messages) {
  if (m.state === "streaming") Object.assign(m, { state: "interrupted", meta: "interrupted: the page was reloaded while the answer streamed" });
}
buildSettings();
renderAll();
const last = conversation.messages[conversation.messages.length - 1];
if (last && last.error) showError(last.error);
loadModels();
view.prompt.focus();
