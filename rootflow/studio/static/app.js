// rootflow studio page: plain JS + canvas. The server validates everything again.
"use strict";
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
const view = $("view"), ctx = view.getContext("2d");
const S = { cur: null, info: null, img: null, overlay: null, tool: "click", showOverlay: true,
  opacity: 0.55, scale: 1, tx: 0, ty: 0, busy: false, drag: null, stroke: null, queue: [],
  cfg: null, t0: 0 };

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (token) headers["X-Studio-Token"] = token;
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(opts.json); }
  const r = await fetch(path, { method: opts.method || "GET", headers, body: opts.body });
  if (!r.ok) {
    let msg = r.status + "";
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return opts.raw ? r : r.json();
}
function status(msg, isError) { const s = $("status"); s.textContent = msg; s.className = isError ? "error" : ""; }
const enc = encodeURIComponent;

// ---------------------------------------------------------------- queue
async function loadQueue() {
  const p = new URLSearchParams();
  const add = (k, v) => { if (v !== "" && v != null) p.set(k, v); };
  add("tube", $("f-tube").value); add("depth", $("f-depth").value);
  add("date_from", $("f-from").value); add("date_to", $("f-to").value);
  add("producer", $("f-producer").value); add("order", $("f-order").value);
  p.set("include_done", $("f-done").checked ? "1" : "0");
  try {
    const q = await api("api/queue?" + p.toString());
    S.queue = q.images;
    $("qinfo").textContent = `${q.n} images, ${q.n_done} done`;
    const ol = $("queue"); ol.innerHTML = "";
    for (const e of q.images) {
      const li = document.createElement("li");
      li.dataset.id = e.image_id;
      li.textContent = e.image_id;
      const m = document.createElement("span"); m.className = "meta";
      m.textContent = `tube ${e.tube ?? "?"} · depth ${e.depth ?? "?"} · ${e.date ?? ""} · ` +
        `priority ${e.priority} · ${e.producers.join(",")}`;
      li.appendChild(m);
      if (e.done) li.classList.add("done");
      if (e.image_id === S.cur) li.classList.add("current");
      li.addEventListener("click", () => openImage(e.image_id));
      ol.appendChild(li);
    }
  } catch (err) { status("queue: " + err.message, true); }
}

// ---------------------------------------------------------------- image + mask
async function openImage(id, proposal) {
  status("opening " + id + " ...");
  S.t0 = performance.now();
  try {
    const qs = proposal ? "?proposal=" + enc(proposal) : "";
    const info = await api("api/images/" + enc(id) + qs);
    if (S.cur !== id) {
      const blob = await (await api("api/images/" + enc(id) + "/image", { raw: true })).blob();
      S.img = await createImageBitmap(blob);
    }
    S.cur = id; S.info = info;
    fillProposals(info);
    await loadMask();
    if (!proposal) fit();
    draw(); updateQueueMarks();
    status(`${id}: ${info.width}x${info.height} px, proposal ${info.proposal ? info.proposal.key : "none (empty mask)"}` +
      ` - first mask in ${((performance.now() - S.t0) / 1000).toFixed(2)} s`);
  } catch (err) { status("open: " + err.message, true); }
}
function fillProposals(info) {
  const sel = $("proposal"); sel.innerHTML = "";
  for (const p of info.proposals) {
    const o = document.createElement("option"); o.value = p.key;
    o.textContent = p.studio ? `studio forest (${p.version})` : p.key;
    if (info.proposal && info.proposal.key === p.key) o.selected = true;
    sel.appendChild(o);
  }
  if (!info.proposals.length) { const o = document.createElement("option"); o.textContent = "none"; sel.appendChild(o); }
}
async function loadMask() {
  const blob = await (await api("api/images/" + enc(S.cur) + "/mask", { raw: true })).blob();
  const bm = await createImageBitmap(blob);
  const c = document.createElement("canvas"); c.width = bm.width; c.height = bm.height;
  const g = c.getContext("2d"); g.drawImage(bm, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height), px = d.data;
  for (let i = 0; i < px.length; i += 4) {
    const on = px[i] > 127;
    px[i] = 255; px[i + 1] = 40; px[i + 2] = 200; px[i + 3] = on ? 255 : 0;
  }
  g.putImageData(d, 0, 0);
  S.overlay = c;
}
function fit() {
  if (!S.img) return;
  const w = view.clientWidth, h = view.clientHeight;
  S.scale = Math.min(w / S.img.width, h / S.img.height);
  S.tx = (w - S.img.width * S.scale) / 2; S.ty = (h - S.img.height * S.scale) / 2;
}
function draw() {
  const w = view.clientWidth, h = view.clientHeight;
  if (view.width !== w || view.height !== h) { view.width = w; view.height = h; }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#222"; ctx.fillRect(0, 0, w, h);
  if (!S.img) return;
  ctx.imageSmoothingEnabled = S.scale < 2;
  ctx.setTransform(S.scale, 0, 0, S.scale, S.tx, S.ty);
  ctx.drawImage(S.img, 0, 0);
  if (S.showOverlay && S.overlay) {
    ctx.globalAlpha = S.opacity; ctx.drawImage(S.overlay, 0, 0); ctx.globalAlpha = 1;
  }
  if (S.info) {  // clicks: green = root, red = background
    for (const c of S.info.clicks) {
      ctx.beginPath(); ctx.arc(c.x + 0.5, c.y + 0.5, 4 / S.scale, 0, 2 * Math.PI);
      ctx.fillStyle = c.label ? "#27d34a" : "#ff3b30"; ctx.fill();
      ctx.lineWidth = 1.5 / S.scale; ctx.strokeStyle = "#fff"; ctx.stroke();
    }
  }
  if (S.stroke && S.stroke.points.length) {
    ctx.beginPath(); ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.lineWidth = 2 * S.stroke.radius + 1;
    ctx.strokeStyle = S.stroke.mode === "brush" ? "rgba(255,40,200,0.6)" : "rgba(40,160,255,0.6)";
    S.stroke.points.forEach(([x, y], i) => i ? ctx.lineTo(x + 0.5, y + 0.5) : ctx.moveTo(x + 0.5, y + 0.5));
    ctx.stroke();
  }
}
function toImage(ev) {
  const r = view.getBoundingClientRect();
  return [Math.floor((ev.clientX - r.left - S.tx) / S.scale), Math.floor((ev.clientY - r.top - S.ty) / S.scale)];
}
function updateQueueMarks() {
  for (const li of $("queue").children) li.classList.toggle("current", li.dataset.id === S.cur);
}

// ---------------------------------------------------------------- edits
async function edit(path, json, what) {
  if (!S.cur || S.busy) return;
  S.busy = true;
  const t = performance.now();
  try {
    const r = await api("api/images/" + enc(S.cur) + "/" + path, { method: "POST", json });
    S.info = Object.assign(S.info, r);
    await loadMask(); draw();
    const server = r.seconds !== undefined ? `, engine ${r.seconds.toFixed(3)} s` : "";
    status(`${what}: mask updated in ${((performance.now() - t) / 1000).toFixed(2)} s${server}` +
      `${r.note ? " - " + r.note : ""} · ${r.n_clicks} clicks, ${r.n_strokes} strokes`);
  } catch (err) { status(what + ": " + err.message, true); }
  finally { S.busy = false; }
}
function click(x, y, label) {
  if (!S.info || x < 0 || y < 0 || x >= S.info.width || y >= S.info.height) return;
  edit("click", { x, y, label, engine: $("engine").value }, label ? "root point" : "background point");
}
const undo = () => edit("undo", {}, "undo");
const redo = () => edit("redo", {}, "redo");
async function accept() {
  if (!S.cur) return;
  const person = $("person").value.trim();
  if (!person) { status("type your name in 'Person' before accepting", true); $("person").focus(); return; }
  try {
    const r = await api("api/images/" + enc(S.cur) + "/accept", { method: "POST", json: { person } });
    status(`accepted ${S.cur}: annotation ${r.annotation_id}, ${r.active_seconds.toFixed(0)} s active`);
    await loadQueue();
    if (r.next) { S.cur = null; await openImage(r.next); }
  } catch (err) { status("accept: " + err.message, true); }
}
async function skip() {
  if (!S.cur) return;
  try {
    const r = await api("api/images/" + enc(S.cur) + "/skip", { method: "POST", json: {} });
    if (r.next) { S.cur = null; await openImage(r.next); }
  } catch (err) { status("skip: " + err.message, true); }
}
function setTool(t) {
  S.tool = t;
  for (const n of ["click", "brush", "eraser"]) $("t-" + n).classList.toggle("active", n === t);
}

// ---------------------------------------------------------------- input
view.addEventListener("contextmenu", (e) => e.preventDefault());
view.addEventListener("mousedown", (e) => {
  e.preventDefault();
  const [x, y] = toImage(e);
  S.drag = { button: e.button, sx: e.clientX, sy: e.clientY, tx: S.tx, ty: S.ty, moved: false };
  if (S.tool !== "click" && e.button === 0) {
    S.stroke = { mode: S.tool, radius: Math.max(1, Math.min(100, parseInt($("radius").value) || 4)), points: [[x, y]] };
  }
});
window.addEventListener("mousemove", (e) => {
  if (!S.drag) return;
  const dx = e.clientX - S.drag.sx, dy = e.clientY - S.drag.sy;
  if (Math.abs(dx) + Math.abs(dy) > 3) S.drag.moved = true;
  if (S.stroke) {
    const p = toImage(e), last = S.stroke.points[S.stroke.points.length - 1];
    if (p[0] !== last[0] || p[1] !== last[1]) S.stroke.points.push(p);
  } else if (S.drag.moved) { S.tx = S.drag.tx + dx; S.ty = S.drag.ty + dy; }
  draw();
});
window.addEventListener("mouseup", (e) => {
  if (!S.drag) return;
  const d = S.drag; S.drag = null;
  if (S.stroke) {
    const st = S.stroke; S.stroke = null;
    const w = S.info ? S.info.width : 0, h = S.info ? S.info.height : 0;
    st.points = st.points.filter(([x, y]) => x >= 0 && y >= 0 && x < w && y < h).slice(0, 4096);
    if (st.points.length) edit("stroke", st, st.mode); else draw();
    return;
  }
  if (!d.moved && e.target === view) {
    const [x, y] = toImage(e);
    if (d.button === 0) click(x, y, 1); else if (d.button === 2) click(x, y, 0);
  }
});
function zoomAt(f, cx, cy) {
  const ns = Math.max(0.02, Math.min(40, S.scale * f));
  S.tx = cx - (cx - S.tx) * ns / S.scale; S.ty = cy - (cy - S.ty) * ns / S.scale; S.scale = ns; draw();
}
view.addEventListener("wheel", (e) => {
  e.preventDefault();
  const r = view.getBoundingClientRect();
  zoomAt(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - r.left, e.clientY - r.top);
}, { passive: false });
window.addEventListener("keydown", (e) => {
  if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
  const k = e.key.toLowerCase();
  if ((e.ctrlKey || e.metaKey) && k === "z") { e.preventDefault(); return e.shiftKey ? redo() : undo(); }
  if ((e.ctrlKey || e.metaKey) && k === "y") { e.preventDefault(); return redo(); }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const w = view.clientWidth / 2, h = view.clientHeight / 2;
  const acts = { c: () => setTool("click"), b: () => setTool("brush"), e: () => setTool("eraser"),
    o: () => { $("overlay").checked = !$("overlay").checked; S.showOverlay = $("overlay").checked; draw(); },
    "[": () => setOpacity(S.opacity - 0.1), "]": () => setOpacity(S.opacity + 0.1),
    z: undo, y: redo, a: accept, enter: accept, s: skip, f: () => { fit(); draw(); },
    "+": () => zoomAt(1.25, w, h), "=": () => zoomAt(1.25, w, h), "-": () => zoomAt(0.8, w, h),
    arrowleft: () => { S.tx += 60; draw(); }, arrowright: () => { S.tx -= 60; draw(); },
    arrowup: () => { S.ty += 60; draw(); }, arrowdown: () => { S.ty -= 60; draw(); } };
  if (acts[k]) { e.preventDefault(); acts[k](); }
});
function setOpacity(v) { S.opacity = Math.max(0, Math.min(1, v)); $("opacity").value = Math.round(S.opacity * 100); draw(); }

$("t-click").onclick = () => setTool("click");
$("t-brush").onclick = () => setTool("brush");
$("t-eraser").onclick = () => setTool("eraser");
$("overlay").onchange = () => { S.showOverlay = $("overlay").checked; draw(); };
$("opacity").oninput = () => { S.opacity = $("opacity").value / 100; draw(); };
$("b-undo").onclick = undo; $("b-redo").onclick = redo; $("b-accept").onclick = accept;
$("b-skip").onclick = skip; $("b-fit").onclick = () => { fit(); draw(); };
$("proposal").onchange = () => { if (S.cur && $("proposal").value !== "none") openImage(S.cur, $("proposal").value); };
$("person").value = localStorage.getItem("rootflow-studio-person") || "";
$("person").onchange = () => localStorage.setItem("rootflow-studio-person", $("person").value.trim());
for (const id of ["f-tube", "f-depth", "f-from", "f-to", "f-producer", "f-order", "f-done"]) $(id).onchange = loadQueue;
window.addEventListener("resize", draw);
$("figlink").href = "figures" + (token ? "?token=" + enc(token) : "");

(async function init() {
  try {
    S.cfg = await api("api/config");
    if (!$("person").value && S.cfg.person) $("person").value = S.cfg.person;
    for (const e of S.cfg.engines) {
      const o = document.createElement("option"); o.value = e; o.textContent = e;
      if (e === S.cfg.default_engine) o.selected = true;
      $("engine").appendChild(o);
    }
    const rnd = Object.entries(S.cfg.versions).filter(([, v]) => v.includes("random-init"));
    if (rnd.length) {
      $("warn").hidden = false;
      $("warn").textContent = `${rnd.map(([k]) => k).join(", ")} runs with random weights ` +
        "(no --base-checkpoint / --rootsam-checkpoint): its masks are meaningless.";
    }
    const tb = $("shortcuts");
    for (const [k, v] of S.cfg.shortcuts) { const tr = tb.insertRow(); tr.insertCell().textContent = k; tr.insertCell().textContent = v; }
  } catch (err) { status("config: " + err.message, true); }
  await loadQueue();
  draw();
})();
