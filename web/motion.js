// Motion mode: /v1/motions/generations, and a 3-D skeleton player on a 2-D canvas (a small
// perspective camera written here: the page needs lines and dots, not a WebGL library).
"use strict";

// SMPL's 22-joint tree (HumanML3D's order): each joint's parent, −1 for the pelvis.
const PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19];
const LEFT = new Set([1, 4, 7, 10, 13, 16, 18, 20]);
const RIGHT = new Set([2, 5, 8, 11, 14, 17, 19, 21]);

// One clock for every sample, so side-by-side motions stay in step.
const clock = { playing: true, frame: 0, frames: 1, fps: 20, last: null };
const players = [];
// What the browser test reads.
window.lcmMotion = { players, clock, draws: 0 };

class Player {
  constructor(motion, seed, request) {
    this.joints = motion.joints;
    this.seed = seed;
    this.request = request;
    const xs = [], zs = [];
    let top = 0;
    for (const f of this.joints) {
      xs.push(f[0][0]); zs.push(f[0][2]);
      for (const j of f) top = Math.max(top, j[1]);
    }
    const mid = (a) => (Math.min(...a) + Math.max(...a)) / 2;
    const span = Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...zs) - Math.min(...zs));
    this.target = [mid(xs), Math.max(top, 1) / 2, mid(zs)];
    this.reach = span / 2 + 1.2;
    this.az = 0.7; this.el = 0.3; this.dist = 1.5 * this.reach + 1.2;

    this.card = document.createElement("figure");
    this.card.className = "player";
    this.canvas = document.createElement("canvas");
    this.canvas.setAttribute("aria-label", `motion, seed ${seed}`);
    const cap = document.createElement("figcaption");
    cap.textContent = `seed ${seed} · ${(this.joints.length / clock.fps).toFixed(1)} s · ${request.prompt}`;
    const links = document.createElement("div");
    links.className = "downloads";
    for (const format of ["bvh", "json", "gif"]) {
      const a = document.createElement("a");
      a.textContent = format.toUpperCase();
      a.className = "download-" + format;
      a.download = `motion-${seed}.${format}`;
      a.href = "#";
      a.addEventListener("click", (ev) => this.download(ev, a, format, motion));
      links.appendChild(a);
    }
    this.card.append(this.canvas, cap, links);
    this.orbit();
  }

  // Drag to orbit, wheel (or pinch, which browsers report as a ctrl-wheel) to zoom.
  orbit() {
    let from = null;
    this.canvas.addEventListener("pointerdown", (ev) => {
      from = [ev.clientX, ev.clientY];
      this.canvas.setPointerCapture(ev.pointerId);
    });
    this.canvas.addEventListener("pointermove", (ev) => {
      if (!from) return;
      this.az -= (ev.clientX - from[0]) * 0.01;
      this.el = Math.min(1.45, Math.max(-0.2, this.el + (ev.clientY - from[1]) * 0.01));
      from = [ev.clientX, ev.clientY];
      this.draw();
    });
    const end = () => { from = null; };
    this.canvas.addEventListener("pointerup", end);
    this.canvas.addEventListener("pointercancel", end);
    this.canvas.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      this.dist = Math.min(40, Math.max(1, this.dist * Math.exp(ev.deltaY * 0.001)));
      this.draw();
    }, { passive: false });
  }

  // JSON is at hand; BVH and GIF are asked for again with the same seed (the server makes the
  // same motion), once, then downloaded from a blob.
  async download(ev, a, format, motion) {
    if (a.href.startsWith("blob:")) return;
    ev.preventDefault();
    try {
      let blob;
      if (format === "json") {
        blob = new Blob([JSON.stringify(motion)], { type: "application/json" });
      } else {
        const body = Object.assign({}, this.request, { n: 1, seed: this.seed, format });
        const r = await fetch("v1/motions/generations", {
          method: "POST", headers: headers(), body: JSON.stringify(body),
        });
        const out = await r.json();
        if (!r.ok) throw new Error(out.error ? out.error.message : r.statusText);
        const d = out.data[0];
        blob = format === "bvh"
          ? new Blob([d.motion], { type: "text/plain" })
          : new Blob([Uint8Array.from(atob(d.b64), (c) => c.charCodeAt(0))], { type: "image/gif" });
      }
      a.href = URL.createObjectURL(blob);
      a.click();
    } catch (e) {
      status(`${format} download: ${e.message}`, true);
    }
  }

  // Perspective projection onto the canvas: camera on a sphere around the target.
  camera(w, h) {
    const [tx, ty, tz] = this.target;
    const c = [tx + this.dist * Math.cos(this.el) * Math.sin(this.az),
      ty + this.dist * Math.sin(this.el),
      tz + this.dist * Math.cos(this.el) * Math.cos(this.az)];
    const norm = (v) => { const l = Math.hypot(...v); return v.map((x) => x / l); };
    const f = norm([tx - c[0], ty - c[1], tz - c[2]]);
    const r = norm([-f[2], 0, f[0]]); // f × up, up = +y
    const u = [r[1] * f[2] - r[2] * f[1], r[2] * f[0] - r[0] * f[2], r[0] * f[1] - r[1] * f[0]];
    const focal = 1.3 * Math.min(w, h);
    return (p) => {
      const d = [p[0] - c[0], p[1] - c[1], p[2] - c[2]];
      const z = d[0] * f[0] + d[1] * f[1] + d[2] * f[2];
      if (z < 0.05) return null;
      return [w / 2 + focal * (d[0] * r[0] + d[1] * r[1] + d[2] * r[2]) / z,
        h / 2 - focal * (d[0] * u[0] + d[1] * u[1] + d[2] * u[2]) / z];
    };
  }

  draw() {
    const cv = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(cv.clientWidth * dpr));
    const h = Math.max(1, Math.round(cv.clientHeight * dpr));
    if (cv.width !== w || cv.height !== h) { cv.width = w; cv.height = h; }
    const g = cv.getContext("2d");
    const project = this.camera(w, h);
    g.fillStyle = "#181818";
    g.fillRect(0, 0, w, h);
    const seg = (a, b) => {
      const p = project(a), q = project(b);
      if (!p || !q) return;
      g.beginPath(); g.moveTo(p[0], p[1]); g.lineTo(q[0], q[1]); g.stroke();
    };
    // Ground grid, half-metre squares around the path.
    g.lineWidth = dpr;
    g.strokeStyle = "#333";
    const [tx, , tz] = this.target;
    const R = Math.ceil(this.reach * 2) / 2;
    for (let k = -R; k <= R + 1e-9; k += 0.5) {
      seg([tx + k, 0, tz - R], [tx + k, 0, tz + R]);
      seg([tx - R, 0, tz + k], [tx + R, 0, tz + k]);
    }
    const t = Math.min(Math.floor(clock.frame), this.joints.length - 1);
    // The root's trail on the ground, up to now.
    g.strokeStyle = "#d9a13b";
    g.lineWidth = 2 * dpr;
    g.beginPath();
    let started = false;
    for (let i = 0; i <= t; i++) {
      const p = project([this.joints[i][0][0], 0, this.joints[i][0][2]]);
      if (!p) continue;
      if (started) g.lineTo(p[0], p[1]); else { g.moveTo(p[0], p[1]); started = true; }
    }
    g.stroke();
    // Bones: left side blue, right side red, spine and head grey.
    const pose = this.joints[t];
    g.lineWidth = 3 * dpr;
    g.lineCap = "round";
    for (let j = 1; j < PARENTS.length; j++) {
      g.strokeStyle = LEFT.has(j) ? "#5b8cff" : RIGHT.has(j) ? "#ff6b5b" : "#ddd";
      seg(pose[PARENTS[j]], pose[j]);
    }
    const head = project(pose[15]);
    if (head) {
      g.fillStyle = "#ddd";
      g.beginPath(); g.arc(head[0], head[1], 5 * dpr, 0, 2 * Math.PI); g.fill();
    }
    window.lcmMotion.draws += 1;
  }
}

function drawAll() {
  for (const p of players) p.draw();
  $("scrub").value = Math.floor(clock.frame);
}

function tick(now) {
  if (clock.playing && players.length) {
    const dt = clock.last === null ? 0 : (now - clock.last) / 1000;
    clock.frame += dt * clock.fps * parseFloat($("speed").value);
    if (clock.frame > clock.frames - 1) {
      if ($("loop").checked) clock.frame = 0;
      else { clock.frame = clock.frames - 1; setPlaying(false); }
    }
    drawAll();
  }
  clock.last = now;
  requestAnimationFrame(tick);
}
requestAnimationFrame(tick);

function setPlaying(on) {
  clock.playing = on;
  $("play").textContent = on ? "Pause" : "Play";
}
$("play").addEventListener("click", () => {
  if (!clock.playing && clock.frame >= clock.frames - 1) clock.frame = 0;
  setPlaying(!clock.playing);
});
$("scrub").addEventListener("input", () => {
  setPlaying(false);
  clock.frame = parseInt($("scrub").value, 10);
  drawAll();
});
window.addEventListener("resize", drawAll);

async function generateMotions() {
  const request = {
    prompt: $("prompt").value,
    n: Math.min(10, Math.max(1, parseInt($("n").value, 10) || 1)),
    steps: parseInt($("steps").value, 10) || undefined,
    guidance_scale: $("guidance").value === "" ? undefined : parseFloat($("guidance").value),
    seconds: $("seconds").value === "" ? undefined : parseFloat($("seconds").value),
    seed: $("seed").value !== "" ? parseInt($("seed").value, 10)
                                 : Math.floor(Math.random() * 4294967296),
    format: "json",
  };
  if ($("negative").value) request.negative_prompt = $("negative").value;
  if ($("sampler").value) request.sampler = $("sampler").value;
  $("generate").disabled = true;
  status(`generating ${request.n} motion(s)…`);
  const t0 = performance.now();
  try {
    const r = await fetch("v1/motions/generations", {
      method: "POST", headers: headers(), body: JSON.stringify(request),
    });
    const out = await r.json();
    if (!r.ok) throw new Error(out.error ? out.error.message : r.statusText);
    const secs = ((performance.now() - t0) / 1000).toFixed(2);
    players.length = 0;
    $("motions").innerHTML = "";
    const shown = Object.assign({}, request);
    delete shown.format;
    for (const d of out.data) {
      const p = new Player(d.motion, d.seed, shown);
      players.push(p);
      $("motions").appendChild(p.card);
    }
    clock.fps = out.data[0].motion.fps;
    clock.frames = Math.max(...players.map((p) => p.joints.length));
    clock.frame = 0;
    $("scrub").max = clock.frames - 1;
    setPlaying(true);
    drawAll();
    // On a narrow screen the players are below the form: bring them into view.
    if (window.innerWidth < 700) $("player-controls").scrollIntoView({ block: "start" });
    status(`${out.data.length} motion(s) in ${secs} s`);
  } catch (e) {
    status("error: " + e.message, true);
  } finally {
    $("generate").disabled = false;
  }
}
