// The lcm browser page: talks to /v1/images/generations with the server's own extensions.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("lcm-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("lcm-key", keyInput.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// Sizes and defaults come from the model (/v1/models).
async function loadModel() {
  let native = 512, multiple = 8, max = 2048;
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const m = body.data[0];
    $("model").textContent = m.id;
    if (m.defaults) {
      $("steps").value = m.defaults.steps;
      $("guidance").value = m.defaults.guidance_scale;
      native = parseInt(m.defaults.size, 10);
    }
    multiple = m.size_multiple; max = m.max_side;
  } catch (e) {
    status("cannot read the model list: " + e.message, true);
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

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
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
      const r = await fetch("v1/images/generations", {
        method: "POST", headers: headers(), body: JSON.stringify(body),
      });
      const out = await r.json();
      if (!r.ok) throw new Error(out.error ? out.error.message : r.statusText);
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      for (const d of out.data) {
        const src = "data:image/png;base64," + d.b64_json;
        const caption = `seed ${d.seed} · ${secs} s · ${body.prompt}`;
        $("latest").appendChild(figure(src, caption));
        $("gallery").prepend(figure(src, caption));
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

loadModel();
