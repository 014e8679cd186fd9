// Chat page for vlm_core.runtime.server: plain JS, no build step, no external resources.
// Streams answers from POST /v1/chat/completions (SSE read with fetch + ReadableStream), stop = AbortController.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], pending: [], controller: null, auth: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("vlm-api-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const health = await (await fetch("/health")).json();
    state.auth = !!health.auth;
    state.model = health.model;
    $("model").textContent = health.model;
    if (state.auth) {
      $("key-row").hidden = false;
      $("api-key").value = localStorage.getItem("vlm-api-key") || "";
      if (!$("api-key").value) $("settings").open = true;
    }
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.ok) {
      const card = (await r.json()).data[0];
      state.model = card.id;
      $("model").textContent = card.id + (card.max_context ? " · " + card.max_context + " ctx" : "");
    }
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// An attachment ({kind, url}) as shown: an image, or a small muted video (never autoplayed) with controls in the
// conversation and without them in the composer, where it is a thumbnail.
function mediaElement(item, sending) {
  const label = sending ? item.kind + " to send" : "attached " + item.kind;
  if (item.kind === "video") {
    const video = document.createElement("video");
    video.src = item.url;
    video.muted = true;
    video.controls = !sending;
    video.preload = "metadata";
    video.setAttribute("aria-label", label);
    return video;
  }
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = label;
  return img;
}

function addMessage(role, text, media) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const item of media || []) div.appendChild(mediaElement(item, false));
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function renderAttachments() {
  const box = $("attachments");
  box.innerHTML = "";
  state.pending.forEach((item, i) => {
    const fig = document.createElement("figure");
    const preview = mediaElement(item, true);
    const rm = document.createElement("button");
    rm.type = "button";
    rm.textContent = "×";
    rm.title = "remove";
    rm.onclick = () => { state.pending.splice(i, 1); renderAttachments(); };
    fig.append(preview, rm);
    box.appendChild(fig);
  });
}

// Files -> pending attachments, as data: URLs. `kind` "video" (the video button: videos, animated GIF/WebP)
// sends each as a video_url part; otherwise images are images and video files (dropped, pasted) videos.
function addFiles(files, kind) {
  for (const file of files) {
    const type = file.type || "";
    const as = kind || (type.startsWith("video/") ? "video" : type.startsWith("image/") ? "image" : null);
    if (!as) continue;
    const reader = new FileReader();
    reader.onload = () => { state.pending.push({ kind: as, url: reader.result }); renderAttachments(); };
    reader.readAsDataURL(file);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function errorText(status, body) {
  try { return JSON.parse(body).error.message; } catch (e) { return body || ("HTTP " + status); }
}

// A turn that failed (a bad image, a wrong key, a refused request) is not part of the conversation: it is
// taken out of the history sent with later messages, kept on screen marked as failed, and its answer bubble
// becomes the error. Otherwise every later question would resend it and fail the same way.
function failTurn(userDiv, bubble, message) {
  state.history.pop();
  userDiv.classList.add("failed");
  userDiv.title = "this message failed and is not sent again";
  bubble.className = "msg error";
  bubble.textContent = message;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;  // Enter while an answer streams: one turn at a time
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  if (state.auth) localStorage.setItem("vlm-api-key", $("api-key").value);
  const media = state.pending.splice(0);
  renderAttachments();
  $("prompt").value = "";
  const userDiv = addMessage("user", text, media);
  const content = media.map((item) => item.kind === "video"
    ? { type: "video_url", video_url: { url: item.url } }
    : { type: "image_url", image_url: { url: item.url } });
  content.push({ type: "text", text });
  state.history.push({ role: "user", content });

  const body = { model: state.model, messages: state.history, stream: true, stream_options: { include_usage: true } };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if ($("temperature").value !== "") body.temperature = parseFloat($("temperature").value);

  const bubble = addMessage("assistant", "");
  const out = bubble.querySelector(".text");
  out.classList.add("cursor");
  const stats = document.createElement("small");
  stats.className = "stats";
  bubble.appendChild(stats);
  state.controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let firstAt = null, answer = "", usage = null, timings = null, finish = null, chunks = 0, failure = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!r.ok) throw new Error(errorText(r.status, await r.text()));
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) usage = msg.usage;
        if (msg.timings) timings = msg.timings;
        for (const choice of msg.choices || []) {
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            if (firstAt === null) firstAt = performance.now();
            answer += delta;
            chunks += 1;
            out.textContent = answer;
            $("log").scrollTop = $("log").scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failure = String(e.message || e);
  } finally {
    out.classList.remove("cursor");
    setBusy(false);
    state.controller = null;
  }
  if (failure !== null) {
    failTurn(userDiv, bubble, answer ? answer + "\n\n" + failure : failure);
    return;
  }
  const end = performance.now();
  state.history.push({ role: "assistant", content: answer });
  const parts = [];
  if (firstAt !== null) {
    const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    parts.push("first token " + ((firstAt - t0) / 1000).toFixed(2) + " s" + (cached ? " (" + cached + " cached)" : ""));
  }
  const tokens = usage ? usage.completion_tokens : chunks;
  if (timings && timings.decode_tokens_per_s) parts.push(timings.decode_tokens_per_s.toFixed(1) + " tokens/s");
  else if (firstAt !== null && end > firstAt && tokens > 1) parts.push(((tokens - 1) / ((end - firstAt) / 1000)).toFixed(1) + " tokens/s");
  parts.push(tokens + " tokens");
  if (usage) parts.push(usage.prompt_tokens + " prompt tokens");
  if (finish) parts.push(finish);
  stats.textContent = parts.join(" · ");
  // boxes and points in the answer (Qwen3-VL grounding, grounding.js), drawn over the image they refer to
  const figure = renderGrounding(groundedImageUrl(state.history), parseGrounding(answer));
  if (figure) {
    bubble.insertBefore(figure, stats);
    const scroll = () => { $("log").scrollTop = $("log").scrollHeight; };
    figure.querySelector("img").addEventListener("load", scroll);
    scroll();
  }
  stats.dataset.finish = finish || "";
}

$("composer").addEventListener("submit", send);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("file").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
$("video").addEventListener("change", (e) => { addFiles(e.target.files, "video"); e.target.value = ""; });
$("camera").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); addFiles(files); }
});
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  addFiles(e.dataTransfer.files);
});
$("clear").addEventListener("click", () => { state.history = []; $("log").innerHTML = ""; });
$("api-key").addEventListener("change", () => { localStorage.setItem("vlm-api-key", $("api-key").value); loadModel(); });
loadModel();
