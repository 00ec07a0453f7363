"use strict";
const token = new URLSearchParams(location.search).get("token");
const f = (v, d = 2) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
if (token) document.getElementById("back").href = "./?token=" + encodeURIComponent(token);
(async function () {
  const r = await fetch("api/figures", { headers: token ? { "X-Studio-Token": token } : {} });
  const d = await r.json();
  const cards = document.getElementById("cards");
  for (const [k, v] of [["images done", d.images_done], ["median active minutes / image", f(d.median_active_minutes)],
    ["median clicks / image", f(d.median_clicks_per_image, 1)], ["mean clicks / image", f(d.mean_clicks_per_image, 1)]]) {
    const c = document.createElement("div"); c.className = "card";
    c.innerHTML = "<div class=big></div><div></div>";
    c.children[0].textContent = v; c.children[1].textContent = k; cards.appendChild(c);
  }
  const row = (tb, cells) => { const tr = tb.insertRow(); for (const x of cells) tr.insertCell().textContent = x; };
  const bp = document.querySelector("#byprop tbody");
  for (const g of d.by_proposal) row(bp, [g.producer, g.version, g.n, f(g.median_iou, 3), f(g.mean_iou, 3), f(g.median_clicks, 1), f(g.median_active_minutes)]);
  const an = document.querySelector("#ann tbody");
  for (const a of d.per_annotation) row(an, [a.image_id, a.person, a.producer ?? "-", a.n_clicks, f(a.active_minutes), f(a.iou, 3)]);
  const svg = document.getElementById("chart"), n = d.per_annotation.length;
  const mx = Math.max(0.01, ...d.per_annotation.map((a) => a.active_minutes));
  const bw = n ? Math.min(40, 700 / n) : 0, ns = "http://www.w3.org/2000/svg";
  d.per_annotation.forEach((a, i) => {
    const h = 170 * a.active_minutes / mx, rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", 10 + i * bw); rect.setAttribute("y", 180 - h);
    rect.setAttribute("width", Math.max(1, bw - 2)); rect.setAttribute("height", h);
    rect.setAttribute("fill", "#2d6cdf");
    const t = document.createElementNS(ns, "title"); t.textContent = `${a.image_id}: ${f(a.active_minutes)} min`;
    rect.appendChild(t); svg.appendChild(rect);
  });
  const ax = document.createElementNS(ns, "text"); ax.setAttribute("x", 10); ax.setAttribute("y", 196);
  ax.textContent = n ? `max ${f(mx)} min` : "no annotations yet"; svg.appendChild(ax);
})();
