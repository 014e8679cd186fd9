// Grounding on the chat page: the boxes and points Qwen3-VL writes in an answer ({"bbox_2d": [x1, y1, x2, y2],
// "label": ...}, {"point_2d": [x, y], ...}; relative to the image, 0..1000 per axis) drawn over the image sent.
// Same rules as kernels/grounding.py, which cites the convention's sources; tests/grounding_cases.json holds the
// two to the same answers. Plain functions, loaded before app.js.
"use strict";

const GROUNDING_SCALE = 1000;
// one colour per label, in order of first appearance (kernels/grounding.py's _PALETTE)
const GROUNDING_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
                           "#808000", "#000075"];

// Index just after the JSON object/array opening at text[start], or -1 when it is cut off or its brackets do not
// match (strings are skipped, escapes included). JSON.parse then says whether it is JSON.
function jsonEnd(text, start) {
  const closers = [];
  let inString = false;
  for (let i = start; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "{") closers.push("}");
    else if (c === "[") closers.push("]");
    else if (c === "}" || c === "]") {
      if (closers.pop() !== c) return -1;
      if (closers.length === 0) return i + 1;
    }
  }
  return -1;
}

// Every complete JSON object or array in the text, left to right; where one cannot be read (cut off, not JSON)
// the scan moves one character on, so the complete values inside a truncated one are still found.
function jsonValues(text) {
  const values = [], opener = /[[{]/g;
  let match;
  while ((match = opener.exec(text)) !== null) {
    const start = match.index, end = jsonEnd(text, start);
    if (end < 0) continue;  // the scan goes on from start + 1
    try {
      values.push(JSON.parse(text.slice(start, end)));
      opener.lastIndex = end;
    } catch (e) { /* not JSON: go on from start + 1 */ }
  }
  return values;
}

function groundingNumbers(value, count) {
  if (!Array.isArray(value) || value.length !== count) return null;
  return value.every((v) => typeof v === "number" && isFinite(v)) ? value : null;
}

function collectGrounding(value, items) {
  if (Array.isArray(value)) {
    for (const child of value) collectGrounding(child, items);
  } else if (value !== null && typeof value === "object") {
    if ("bbox_2d" in value || "point_2d" in value) {
      const bbox = groundingNumbers(value.bbox_2d, 4), point = groundingNumbers(value.point_2d, 2);
      if (bbox || point) {
        const attributes = {};
        for (const key of Object.keys(value)) {
          if (!["bbox_2d", "point_2d", "label"].includes(key)) attributes[key] = value[key];
        }
        items.push({ label: typeof value.label === "string" ? value.label : "", bbox_2d: bbox, point_2d: point,
                     attributes });
      }
      return;
    }
    for (const child of Object.values(value)) collectGrounding(child, items);
  }
}

// The boxes and points of an answer, in the model's relative coordinates, in the order written.
function parseGrounding(text) {
  const items = [];
  for (const value of jsonValues(text)) collectGrounding(value, items);
  return items;
}

function clipRelative(value, scale) { return Math.min(Math.max(value, 0), scale) / scale; }

// Items -> {label, bbox: [x1, y1, x2, y2] | null, point: [x, y] | null} in pixels of a width x height image,
// clipped to it, x1 <= x2 and y1 <= y2 (kernels.grounding.to_pixels).
function groundingToPixels(items, width, height, scale = GROUNDING_SCALE) {
  const px = (value, size) => Math.round(clipRelative(value, scale) * size * 100) / 100;
  return items.map((item) => {
    let bbox = null, point = null;
    if (item.bbox_2d) {
      const [x1, y1, x2, y2] = item.bbox_2d;
      const xs = [px(x1, width), px(x2, width)].sort((a, b) => a - b);
      const ys = [px(y1, height), px(y2, height)].sort((a, b) => a - b);
      bbox = [xs[0], ys[0], xs[1], ys[1]];
    }
    if (item.point_2d) point = [px(item.point_2d[0], width), px(item.point_2d[1], height)];
    return { label: item.label, bbox, point, bbox_2d: item.bbox_2d, point_2d: item.point_2d };
  });
}

// The image an answer's boxes refer to: the first image of the last user message holding images (as
// runtime/output/grounding.py chooses it), from the conversation the page sends.
function groundedImageUrl(history) {
  for (let i = history.length - 1; i >= 0; i--) {
    const message = history[i];
    if (message.role !== "user" || !Array.isArray(message.content)) continue;
    const part = message.content.find((p) => p.type === "image_url");
    if (part) return part.image_url.url;
  }
  return null;
}

function groundingElement(className, label, color) {
  const el = document.createElement("div");
  el.className = className;
  el.style.setProperty("--color", color);
  if (label) {
    const tag = document.createElement("span");
    tag.className = "glabel";
    tag.textContent = label;
    el.appendChild(tag);
  }
  return el;
}

// A figure with the image, its boxes and points over it (positioned in % of the image, so they follow its
// displayed size) and a checkbox that shows or hides them; null when the answer holds none. Each box and point
// carries its pixel coordinates on the image as sent (data-px, title) once the image has loaded.
function renderGrounding(imageUrl, items) {
  if (!items.length || !imageUrl) return null;
  const figure = document.createElement("figure");
  figure.className = "grounding";
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.alt = "image with the answer's boxes";
  const overlay = document.createElement("div");
  overlay.className = "overlay";
  const colors = new Map();
  const marks = items.map((item) => {
    if (!colors.has(item.label)) colors.set(item.label, GROUNDING_PALETTE[colors.size % GROUNDING_PALETTE.length]);
    const color = colors.get(item.label);
    const made = [];
    if (item.bbox_2d) {
      const [x1, y1, x2, y2] = item.bbox_2d.map((v) => clipRelative(v, GROUNDING_SCALE) * 100);
      const box = groundingElement("gbox", item.label, color);
      Object.assign(box.style, { left: Math.min(x1, x2) + "%", top: Math.min(y1, y2) + "%",
                                 width: Math.abs(x2 - x1) + "%", height: Math.abs(y2 - y1) + "%" });
      if (Math.min(y1, y2) < 6) box.classList.add("label-inside");  // no room above the box for its label
      made.push(box);
    }
    if (item.point_2d) {
      const [x, y] = item.point_2d.map((v) => clipRelative(v, GROUNDING_SCALE) * 100);
      const dot = groundingElement("gpoint", item.bbox_2d ? "" : item.label, color);
      Object.assign(dot.style, { left: x + "%", top: y + "%" });
      made.push(dot);
    }
    made.forEach((el) => overlay.appendChild(el));
    return made;
  });
  img.addEventListener("load", () => {
    const pixels = groundingToPixels(items, img.naturalWidth, img.naturalHeight);
    marks.forEach((made, i) => {
      const coords = [pixels[i].bbox, pixels[i].point].filter(Boolean);
      made.forEach((el, j) => {
        el.dataset.px = coords[j].join(",");
        const where = coords[j].map((v) => Math.round(v)).join(", ") + " px";
        el.title = (items[i].label ? items[i].label + ": " : "") + where;
      });
    });
    figure.dataset.size = img.naturalWidth + "x" + img.naturalHeight;
  });
  img.src = imageUrl;
  frame.append(img, overlay);
  const caption = document.createElement("figcaption");
  const toggle = document.createElement("input");
  toggle.type = "checkbox";
  toggle.checked = true;
  toggle.className = "grounding-toggle";
  toggle.addEventListener("change", () => { overlay.hidden = !toggle.checked; });
  const count = (n, one, many) => (n ? n + " " + (n === 1 ? one : many) : "");
  const boxes = items.filter((i) => i.bbox_2d).length, points = items.length - boxes;
  const label = document.createElement("label");
  const shown = [count(boxes, "box", "boxes"), count(points, "point", "points")].filter(Boolean).join(" and ");
  label.append(toggle, " show " + shown);
  caption.appendChild(label);
  figure.append(frame, caption);
  return figure;
}
