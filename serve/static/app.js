// The toolvlm chat page: sessions listed and resumable, images uploaded or pasted, answers streamed (SSE over
// fetch), tool images, counts and boxes inline with their handles, and each turn's tool trace in a <details>.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { session: null, pending: [], busy: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function figure(url, caption, tool) {
  const img = el("img", { src: url, alt: caption });
  if (tool) img.setAttribute("data-tool", tool);
  // a session image may be named before the server has written it: try again a few times
  let tries = 0;
  img.addEventListener("error", () => {
    if (tries >= 6) return;
    tries += 1;
    setTimeout(() => { img.src = url + (url.includes("?") ? "&" : "?") + "retry=" + tries; }, 250 * tries);
  });
  return el("figure", {}, el("a", { href: url, target: "_blank" }, img), el("figcaption", { text: caption }));
}

function roundBox(box) {
  return "[" + box.map((v) => Math.round(v)).join(", ") + "]";
}

// One short fact per tool step: the count, the boxes found, or the error.
function fact(step) {
  const a = step.artifact || {};
  const node = el("span", { class: "fact" + (step.error ? " error" : "") });
  node.setAttribute("data-tool", step.tool || "");
  if (step.error) {
    node.textContent = `${step.tool || "call"}: ${step.content}`;
  } else if (step.tool === "counter" && typeof a.count === "number") {
    node.setAttribute("data-count", String(a.count));
    node.textContent = `count: ${a.count} ${a.phrase || ""}`.trim();
  } else if (Array.isArray(a.boxes) && a.boxes.length) {
    const shown = a.boxes.slice(0, 3).map(roundBox).join(" ");
    node.textContent = `${step.tool}: ${a.boxes.length} box(es) ${shown}${a.boxes.length > 3 ? " …" : ""}`;
  } else {
    node.textContent = `${step.tool}: ${step.content}`.slice(0, 160);
  }
  return node;
}

// A turn's DOM: the question with its images, then the answer, tool images, facts and the foldable trace.
function turnView(question, userImages) {
  const answer = el("div", { class: "answer" });
  const images = el("div", { class: "images" });
  const facts = el("div", { class: "facts" });
  const list = el("ol");
  const summary = el("summary", { text: "tool trace (0 steps)" });
  const trace = el("details", { class: "trace" }, summary, list);
  trace.hidden = true;
  const thumbs = el("div", { class: "thumbs" });
  for (const im of userImages) thumbs.append(figure(im.url, im.handle || "image"));
  const node = el(
    "div", { class: "turn" },
    el("div", { class: "user" }, el("div", { class: "question", text: question }), thumbs),
    el("div", { class: "assistant" }, answer, images, facts, trace),
  );
  $("#log").append(node);
  let steps = 0;
  return {
    node, answer, thumbs,
    setUserImages(refs) {
      thumbs.textContent = "";
      for (const im of refs) thumbs.append(figure(im.url, im.handle));
    },
    addStep(step) {
      steps += 1;
      trace.hidden = false;
      summary.textContent = `tool trace (${steps} step${steps === 1 ? "" : "s"})`;
      const item = el("li", {}, el("b", { text: step.tool || "(malformed call)" }), " ",
        el("code", { text: JSON.stringify(step.arguments) }), el("div", { text: step.content }));
      if (step.artifact && Object.keys(step.artifact).length) {
        item.append(el("code", { text: JSON.stringify(step.artifact).slice(0, 600) }));
      }
      list.append(item);
      facts.append(fact(step));
      for (const im of step.images) images.append(figure(im.url, `${im.handle} (${step.tool})`, step.tool));
    },
    finish(text, finish) {
      answer.textContent = text;
      if (finish && finish !== "answer") answer.append(el("em", { text: ` [${finish}]` }));
    },
    error(message) {
      node.querySelector(".assistant").append(el("div", { class: "error-box", text: message }));
    },
  };
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// -- sessions -------------------------------------------------------------------------------------------

async function refreshSessions() {
  const { sessions } = await api("/api/sessions");
  const ul = $("#sessions");
  ul.textContent = "";
  for (const s of sessions) {
    const li = el("li", {}, s.title || "(no question yet)",
      el("span", { class: "meta", text: `${s.created || s.id} · ${s.turns} turn(s) · ${s.images} image(s)` }));
    li.setAttribute("data-session", s.id);
    if (s.id === state.session) li.classList.add("current");
    li.addEventListener("click", () => openSession(s.id));
    ul.append(li);
  }
}

function setSession(id) {
  state.session = id;
  $("#session-label").textContent = id ? `session ${id}` : "new session";
  if (id) history.replaceState(null, "", `#session=${id}`);
  for (const li of document.querySelectorAll("#sessions li")) {
    li.classList.toggle("current", li.getAttribute("data-session") === id);
  }
}

async function openSession(id) {
  const data = await api(`/api/sessions/${encodeURIComponent(id)}`);
  $("#log").textContent = "";
  setSession(id);
  for (const turn of data.turns) {
    const refs = turn.images.map((h) => ({ handle: h, url: `/sessions/${id}/images/${h}.png` }));
    const view = turnView(turn.question, refs);
    for (const step of turn.steps) view.addStep(step);
    if (turn.answer) view.finish(turn.answer.text, turn.answer.finish);
  }
}

function newSession() {
  $("#log").textContent = "";
  setSession(null);
  history.replaceState(null, "", "#");
}

// -- images to send -------------------------------------------------------------------------------------

function addPending(file) {
  if (!file.type.startsWith("image/")) return;
  const url = URL.createObjectURL(file);
  const item = { file, url };
  state.pending.push(item);
  const remove = el("button", { type: "button", text: "remove" });
  const fig = el("figure", {}, el("img", { src: url, alt: file.name }), remove);
  remove.addEventListener("click", () => {
    state.pending = state.pending.filter((p) => p !== item);
    fig.remove();
  });
  $("#pending").append(fig);
}

// -- a turn ---------------------------------------------------------------------------------------------

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

async function ask(question) {
  const images = state.pending.splice(0);
  $("#pending").textContent = "";
  const view = turnView(question, images.map((p) => ({ url: p.url, handle: "" })));
  view.node.scrollIntoView({ block: "end" });
  if (!state.session) setSession((await api("/api/sessions", { method: "POST" })).id);
  const form = new FormData();
  form.append("question", question);
  for (const p of images) form.append("images", p.file, p.file.name || "pasted.png");
  const response = await fetch(`/api/sessions/${state.session}/turns`, { method: "POST", body: form });
  if (!response.ok) {
    view.error(await errorText(response));
    return;
  }
  let text = "";
  for await (const event of sseEvents(response)) {
    if (event.type === "turn") view.setUserImages(event.images);
    else if (event.type === "token") { text += event.text; view.answer.textContent = text; }
    else if (event.type === "tool_call") $("#status").textContent = `running ${event.tool}…`;
    else if (event.type === "tool_result") { view.addStep(event.step); $("#status").textContent = "thinking…"; }
    else if (event.type === "answer") view.finish(event.text, event.finish);
    else if (event.type === "error") view.error(event.message);
    $("#log").scrollTop = $("#log").scrollHeight;
  }
}

async function onSubmit(event) {
  event.preventDefault();
  const question = $("#question").value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("#send").disabled = true;
  $("#question").value = "";
  $("#status").textContent = "thinking…";
  try {
    await ask(question);
  } catch (err) {
    $("#log").append(el("div", { class: "error-box", text: String(err.message || err) }));
  } finally {
    state.busy = false;
    $("#send").disabled = false;
    $("#status").textContent = "";
    refreshSessions().catch(() => {});
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#ask").addEventListener("submit", onSubmit);
  $("#question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#ask").requestSubmit(); }
  });
  $("#images").addEventListener("change", (e) => { for (const f of e.target.files) addPending(f); e.target.value = ""; });
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData.items) if (item.kind === "file") addPending(item.getAsFile());
  });
  $("#new-session").addEventListener("click", newSession);
  const match = location.hash.match(/session=([\w.-]+)/);
  refreshSessions().then(() => (match ? openSession(match[1]) : null)).catch((err) => {
    $("#status").textContent = String(err.message || err);
  });
});
