// The lcm browser page: talks to /v1/images/generations with the server's own extensions (and,
// in motion mode, to /v1/motions/generations through motion.js).
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("lcm-key") || "";
// A new key may open the model list that an old one could not read.
keyInput.addEventListener("change", () => {
  localStorage.setItem("lcm-key", keyInput.value);
  loadModels();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// The served models by kind (/v1/models): their defaults, limits and example prompts.
const models = {};
let mode = "image";

async function loadModels() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    for (const m of body.data) {
      if (m.kind === "text-to-image") models.image = m;
      if (m.kind === "text-to-motion") models.motion = m;
    }
  } catch (e) {
    status("cannot read the model list: " + e.message, true);
  }
  $("mode-image").hidden = !models.image;
  $("mode-motion").hidden = !models.motion;
  buildSizes(models.image);
  setMode(models.image || !models.motion ? "image" : "motion");
}

function buildSizes(m) {
  let native = 512, multiple = 8, max = 2048;
  if (m) {
    if (m.defaults) native = parseInt(m.defaults.size, 10);
    multiple = m.size_multiple; max = m.max_side;
  }
  const sizes = new Set();
  for (const f of [0.5, 0.75, 1, 1.5, 2]) {
    const s = Math.round((native * f) / multiple) * multiple;
    if (s > 0 && s <= max) sizes.add(s);
  }
  const sel = $("size");
  sel.innerHTML = "";
  for (const s of sizes) {
    const o = document.createElement("option");
    o.value = s + "x" + s; o.textContent = s + " × " + s;
    if (s === native) o.selected = true;
    sel.appendChild(o);
  }
}

// Switch between image and motion: the model's own defaults and example prompts.
function setMode(next) {
  mode = next;
  document.body.dataset.mode = mode;
  for (const id of ["mode-image", "mode-motion"]) {
    $(id).setAttribute("aria-selected", String($(id).dataset.mode === mode));
  }
  const m = models[mode];
  $("model").textContent = m ? m.id : "(no " + mode + " model)";
  if (m && m.defaults) {
    $("steps").value = m.defaults.steps;
    $("guidance").value = m.defaults.guidance_scale;
    if (m.defaults.seconds) $("seconds").value = m.defaults.seconds;
  }
  if (m && m.max_seconds) $("seconds").max = m.max_seconds;
  $("generate").textContent = mode === "motion" ? "Generate motion" : "Generate";
  const chips = $("examples");
  chips.innerHTML = "";
  const examples = (m && m.examples) || [];
  $("prompt").placeholder = examples[0] || "";
  for (const text of examples) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "chip"; b.textContent = text;
    b.addEventListener("click", () => { $("prompt").value = text; $("prompt").focus(); });
    chips.appendChild(b);
  }
}
for (const id of ["mode-image", "mode-motion"]) {
  $(id).addEventListener("click", () => setMode($(id).dataset.mode));
}

$("random-seed").addEventListener("click", () => {
  $("seed").value = Math.floor(Math.random() * 4294967296);
});

function figure(src, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src; img.alt = caption;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

// ---- Image-to-image: a drawing canvas (or an upload) sent to /sdapi/v1/img2img.
const canvas = $("sketch");
const ctx = canvas.getContext("2d");
function clearCanvas() {
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}
clearCanvas();
let drawing = null;
function canvasPoint(ev) {
  const r = canvas.getBoundingClientRect();
  return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height];
}
canvas.addEventListener("pointerdown", (ev) => {
  drawing = canvasPoint(ev);
  canvas.setPointerCapture(ev.pointerId);
  ctx.fillStyle = $("brush-colour").value;
  ctx.beginPath();
  ctx.arc(drawing[0], drawing[1], (parseFloat($("brush-size").value) || 16) / 2, 0, 2 * Math.PI);
  ctx.fill();
});
canvas.addEventListener("pointermove", (ev) => {
  if (!drawing) return;
  const p = canvasPoint(ev);
  ctx.strokeStyle = $("brush-colour").value;
  ctx.lineWidth = parseFloat($("brush-size").value) || 16;
  ctx.lineCap = "round";
  ctx.beginPath();
  ctx.moveTo(drawing[0], drawing[1]);
  ctx.lineTo(p[0], p[1]);
  ctx.stroke();
  drawing = p;
  sketchChanged();
});
const endStroke = () => { if (drawing) { drawing = null; sketchChanged(); } };
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);
$("clear").addEventListener("click", () => { clearCanvas(); sketchChanged(); });
$("upload").addEventListener("change", () => {
  const f = $("upload").files[0];
  if (!f) return;
  const img = new Image();
  img.onload = () => {
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    $("use-sketch").checked = true;
    sketchChanged();
  };
  img.src = URL.createObjectURL(f);
});
$("live").addEventListener("change", () => {
  if ($("live").checked) { $("use-sketch").checked = true; sketchChanged(); }
});

// Live mode: each change schedules one request (debounced); at most one is in flight per page,
// and a result is shown only if no newer change happened since it was sent.
let version = 0, inFlight = 0, debounce = null, pendingAfterFlight = false;
// Counters the browser test reads.
window.lcmLive = { maxInFlight: 0, sent: 0, shown: 0, dropped: 0, images: new Set() };
function sketchChanged() {
  version += 1;
  if (!$("live").checked) return;
  clearTimeout(debounce);
  debounce = setTimeout(liveRequest, 250);
}
function sketchB64() {
  return canvas.toDataURL("image/png");
}
async function img2img(prompt, seed) {
  const size = ($("size").value || "").split("x").map((v) => parseInt(v, 10));
  const body = {
    prompt, seed, init_images: [sketchB64()],
    denoising_strength: parseFloat($("strength").value) || 0.6,
    steps: parseInt($("steps").value, 10) || undefined,
    cfg_scale: $("guidance").value === "" ? undefined : parseFloat($("guidance").value),
    width: size[0] || undefined, height: size[1] || undefined,
  };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  if ($("sampler").value) body.sampler_name = $("sampler").value.toUpperCase();
  const r = await fetch("sdapi/v1/img2img", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const out = await r.json();
  if (!r.ok) throw new Error(out.error ? out.error.message : r.statusText);
  return { src: "data:image/png;base64," + out.images[0], seed: out.parameters.seed };
}
async function liveRequest() {
  if (inFlight > 0) { pendingAfterFlight = true; return; }
  if (!$("prompt").value) { status("type a prompt for live mode", true); return; }
  const sent = version;
  inFlight += 1;
  window.lcmLive.sent += 1;
  window.lcmLive.maxInFlight = Math.max(window.lcmLive.maxInFlight, inFlight);
  const seed = $("seed").value !== "" ? parseInt($("seed").value, 10) : 0;
  const t0 = performance.now();
  try {
    const img = await img2img($("prompt").value, seed);
    if (sent === version) {
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      $("latest").innerHTML = "";
      $("latest").appendChild(figure(img.src, `live · seed ${img.seed} · ${secs} s`));
      window.lcmLive.shown += 1;
      window.lcmLive.images.add(img.src);
      status(`live: ${secs} s`);
    } else {
      window.lcmLive.dropped += 1;
    }
  } catch (e) {
    status("live: " + e.message, true);
  } finally {
    inFlight -= 1;
  }
  if (pendingAfterFlight || sent !== version) { pendingAfterFlight = false; liveRequest(); }
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (mode === "motion") { generateMotions(); return; }
  const n = Math.min(10, Math.max(1, parseInt($("n").value, 10) || 1));
  // One request per image, so each shows as soon as it is ready (the server batches them anyway);
  // image i uses seed + i, as the server itself numbers a request's images.
  const base = $("seed").value !== "" ? parseInt($("seed").value, 10)
                                      : Math.floor(Math.random() * 4294967296);
  const common = {
    prompt: $("prompt").value,
    n: 1,
    size: $("size").value || undefined,
    steps: parseInt($("steps").value, 10) || undefined,
    guidance_scale: $("guidance").value === "" ? undefined : parseFloat($("guidance").value),
    response_format: "b64_json",
  };
  if ($("negative").value) common.negative_prompt = $("negative").value;
  if ($("sampler").value) common.sampler = $("sampler").value;
  $("generate").disabled = true;
  $("latest").innerHTML = "";
  status(`generating ${n} image(s)…`);
  const t0 = performance.now();
  let done = 0, failed = null;
  await Promise.all(Array.from({ length: n }, async (_, i) => {
    const body = Object.assign({}, common, { seed: (base + i) % 4294967296 });
    try {
      let data;
      if ($("use-sketch").checked) {
        const img = await img2img(body.prompt, body.seed);
        data = [{ src: img.src, seed: img.seed }];
      } else {
        const r = await fetch("v1/images/generations", {
          method: "POST", headers: headers(), body: JSON.stringify(body),
        });
        const out = await r.json();
        if (!r.ok) throw new Error(out.error ? out.error.message : r.statusText);
        data = out.data.map((d) => ({ src: "data:image/png;base64," + d.b64_json, seed: d.seed }));
      }
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      for (const d of data) {
        const caption = `seed ${d.seed} · ${secs} s · ${body.prompt}`;
        $("latest").appendChild(figure(d.src, caption));
        $("gallery").prepend(figure(d.src, caption));
      }
      done += 1;
      status(`${done} of ${n} image(s), ${secs} s`);
    } catch (e) {
      failed = e;
    }
  }));
  const secs = ((performance.now() - t0) / 1000).toFixed(2);
  if (failed) status(`${done} of ${n} image(s); error: ${failed.message}`, true);
  else status(`${n} image(s) in ${secs} s`);
  $("generate").disabled = false;
});

loadModels();
