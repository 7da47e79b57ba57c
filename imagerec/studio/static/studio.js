// imagerec studio: selection, keyboard shortcuts and the POSTs of every action.
// Plain JavaScript, no library; each action reloads the page so it always shows the database.
"use strict";
(function () {
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (sel) => document.querySelector(sel);
  const $$ = (sel) => Array.from(document.querySelectorAll(sel));

  function say(text, isError) {
    const box = $("#message");
    box.textContent = text;
    box.className = isError ? "error" : "ok";
  }
  const saved = sessionStorage.getItem("studio-message");
  if (saved) { say(saved, false); sessionStorage.removeItem("studio-message"); }

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
    if (!response.ok) { say(data.error || ("error " + response.status), true); throw new Error(data.error); }
    return data;
  }
  async function act(url, body, done) {
    try {
      const data = await post(url, body);
      sessionStorage.setItem("studio-message", done(data));
      location.reload();
    } catch (e) { /* already shown */ }
  }

  // -- undo -------------------------------------------------------------------------------------
  const undo = () => act("/api/undo", {}, (d) => d.undone ? "undone: " + d.undone : "nothing to undo");
  $("#undo").addEventListener("click", undo);

  // -- selection in a grid: click toggles, shift-click selects a range, drag draws a box ----------
  const grid = $("#grid");
  let anchor = null;
  const figures = () => $$("#grid figure[data-id]");
  const selected = () => figures().filter((f) => f.classList.contains("selected")).map((f) => Number(f.dataset.id));
  function refresh() {
    const counter = $("#selected");
    if (counter) counter.textContent = selected().length + " selected";
  }
  if (grid) {
    grid.addEventListener("click", (ev) => {
      const fig = ev.target.closest("figure[data-id]");
      if (!fig || ev.target.closest("a")) return;
      const all = figures();
      if (ev.shiftKey && anchor !== null) {
        const [a, b] = [all.indexOf(anchor), all.indexOf(fig)].sort((x, y) => x - y);
        all.slice(a, b + 1).forEach((f) => f.classList.add("selected"));
      } else {
        fig.classList.toggle("selected");
        anchor = fig;
      }
      refresh();
    });
    let box = null, start = null;
    grid.addEventListener("mousedown", (ev) => {
      if (ev.button !== 0 || ev.shiftKey) return;
      start = { x: ev.pageX, y: ev.pageY };
      ev.preventDefault();
    });
    document.addEventListener("mousemove", (ev) => {
      if (!start) return;
      const w = Math.abs(ev.pageX - start.x), h = Math.abs(ev.pageY - start.y);
      if (!box && w + h < 8) return;  // a click, not a drag
      if (!box) { box = document.createElement("div"); box.className = "dragbox"; document.body.appendChild(box); }
      const left = Math.min(ev.pageX, start.x), top = Math.min(ev.pageY, start.y);
      Object.assign(box.style, { left: left + "px", top: top + "px", width: w + "px", height: h + "px" });
    });
    document.addEventListener("mouseup", () => {
      if (box) {
        const r = box.getBoundingClientRect();
        figures().forEach((f) => {
          const q = f.getBoundingClientRect();
          if (q.right > r.left && q.left < r.right && q.bottom > r.top && q.top < r.bottom) f.classList.add("selected");
        });
        box.remove();
        box = null;
        refresh();
        grid.dataset.dragged = "1";
        setTimeout(() => delete grid.dataset.dragged, 0);
      }
      start = null;
    });
    grid.addEventListener("click", (ev) => { if (grid.dataset.dragged) ev.stopImmediatePropagation(); }, true);
  }

  function need() {
    const ids = selected();
    if (!ids.length) say("select images first: click, shift-click or drag", true);
    return ids;
  }
  function move() {
    const ids = need();
    if (!ids.length) return;
    act("/api/move", { image_ids: ids, group_id: Number($("#target").value) },
      () => "moved " + ids.length + " image(s) to " + $("#target").selectedOptions[0].textContent.replace(/ \(\d+\)$/, ""));
  }
  function exclude(reason) {
    const ids = need();
    if (ids.length) act("/api/exclude", { image_ids: ids, reason: reason }, () => "marked " + ids.length + " image(s) as " + reason);
  }
  const junk = () => exclude("junk");
  const on = (sel, fn) => { const el = $(sel); if (el) el.addEventListener("click", fn); };
  on("#move", move);
  on("#junk", junk);
  on("#duplicate", () => exclude("duplicate"));
  on("#movenew", () => {
    const ids = need(), name = $("#newname").value;
    if (ids.length) act("/api/move", { image_ids: ids, new_name: name }, () => "moved " + ids.length + " image(s) to new class " + name);
  });
  on("#restore", () => {
    const ids = need();
    if (ids.length) act("/api/restore", { image_ids: ids }, () => "put " + ids.length + " image(s) back into use");
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input, select, textarea")) return;
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "z") { ev.preventDefault(); undo(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "ArrowRight" && $("#next")) location.href = $("#next").href;
    else if (ev.key === "ArrowLeft" && $("#prev")) location.href = $("#prev").href;
    else if (!grid) return;
    else if (ev.key === "a") { figures().forEach((f) => f.classList.add("selected")); refresh(); }
    else if (ev.key === "Escape") { figures().forEach((f) => f.classList.remove("selected")); refresh(); }
    else if (ev.key === "j" && $("#junk")) junk();
    else if (ev.key === "d" && $("#duplicate")) exclude("duplicate");
    else if (ev.key === "m" && $("#move")) move();
  });

  // -- groups page: rename, merge ------------------------------------------------------------------
  $$("form.rename").forEach((form) => form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = form.elements.name.value;
    act("/api/rename", { group_id: Number(form.dataset.group), name: name }, (d) => "renamed to " + d.name);
  }));
  on("#mergebtn", () => {
    const sources = $$("input.merge:checked").map((c) => Number(c.value));
    act("/api/merge", { sources: sources, target: Number($("#mergetarget").value) }, () => "merged " + sources.length + " group(s)");
  });

  // -- export ----------------------------------------------------------------------------------------
  $$("button.export").forEach((b) => b.addEventListener("click", async () => {
    try {
      const d = await post("/api/export", { kind: b.dataset.kind });
      say("wrote " + d.rows + " image(s): " + d.path, false);
    } catch (e) { /* shown */ }
  }));

  // -- train: start, then poll the status until the run is over -------------------------------------
  function poll() {
    const bar = $("#trainprogress"), status = $("#trainstatus");
    if (!status) return;
    fetch("/api/train/status", { credentials: "same-origin" }).then((r) => r.json()).then((s) => {
      if (!s.phase) return;
      bar.hidden = false;
      bar.value = s.progress || 0;
      status.textContent = "run " + s.run_id + ": " + s.phase + " " + Math.round(100 * (s.progress || 0)) + "%" + (s.message ? " - " + s.message : "");
      if (s.phase === "training" || s.phase === "evaluating") setTimeout(poll, 1000);
      else if (s.phase === "done" && !location.pathname.endsWith("/" + s.run_id)) location.href = "/train/" + s.run_id;
      else if (s.phase === "done" && $("#runstatus") && $("#runstatus").textContent !== "done") location.reload();
    });
  }
  const trainform = $("#trainform");
  if (trainform) trainform.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const d = await post("/api/train", { budget: trainform.elements.budget.value, backbone: trainform.elements.backbone.value });
      say("training run " + d.run_id + " started", false);
      poll();
    } catch (e) { /* shown */ }
  });
  poll();

  // -- audit -----------------------------------------------------------------------------------------
  on("#auditrun", () => act("/api/audit/run", {}, () => "audit started"));
  const auditstate = $("#auditstate");
  if (auditstate && auditstate.dataset.state === "running") setTimeout(() => location.reload(), 2000);
  $$("button.decide").forEach((b) => b.addEventListener("click", () => {
    const ids = b.dataset.ids ? b.dataset.ids.split(",").map(Number) : [];
    act("/api/audit/decide", { finding: b.dataset.finding, decision: b.dataset.decision, image_ids: ids, label: b.dataset.label },
      () => b.dataset.finding + ": " + b.dataset.decision);
  }));
  // -- review: a click on a wrong image gives it the next most likely class; Accept takes the page -----
  const reviewgrid = $("#reviewgrid");
  const reviewstate = $("#reviewstate");
  if (reviewstate && reviewstate.dataset.state === "idle") post("/api/review/start", {}).then(() => location.reload(), () => {});
  else if (reviewstate && reviewstate.dataset.state === "running") setTimeout(() => location.reload(), 1000);
  on("#reviewstart", () => act("/api/review/start", {}, () => "computing the suggestions again"));
  if (reviewgrid) {
    const names = JSON.parse(reviewgrid.dataset.names);
    const cards = () => $$("#reviewgrid figure[data-id]");
    let current = null;
    // each card: the class it was shown with, the others most likely first, and what is chosen now
    function choose(fig, group, isNew) {
      const shown = fig.dataset.group;
      fig.dataset.chosen = group;
      fig.dataset.isnew = isNew ? "1" : "";
      fig.classList.toggle("wrong", String(group) !== shown || !!isNew);
      if (String(group) === shown && !isNew) fig.querySelector("figcaption").textContent = fig.dataset.caption;
      else fig.querySelector("figcaption").textContent = "\u2192 " + (isNew ? group : names[group]);
      cards().forEach((f) => f.classList.toggle("current", f === fig));
      current = fig;
    }
    cards().forEach((fig) => { fig.dataset.caption = fig.querySelector("figcaption").textContent; fig.dataset.chosen = fig.dataset.group; });
    reviewgrid.addEventListener("click", (ev) => {
      const fig = ev.target.closest("figure[data-id]");
      if (!fig) return;
      const cycle = [fig.dataset.group, ...fig.dataset.choices.split(",").filter((g) => g)];
      const at = fig.dataset.isnew ? 0 : cycle.indexOf(fig.dataset.chosen);
      choose(fig, cycle[(at + 1) % cycle.length], false);
    });
    $$("button.pick").forEach((b) => b.addEventListener("click", () => {
      if (!current) { say("click the wrong image first, then its class", true); return; }
      choose(current, b.dataset.group, false);
    }));
    on("#picknew", () => {
      const name = $("#newclass").value.trim();
      if (!current || !name) { say("click the wrong image first, type its new class, then press new class", true); return; }
      choose(current, name, true);
    });
    function accept() {
      const figs = cards();
      const fresh = [...new Set(figs.filter((f) => f.dataset.isnew).map((f) => f.dataset.chosen))];
      if (fresh.length > 1) { say("one new class a page: accept, then make the next one", true); return; }
      const body = { image_ids: figs.map((f) => Number(f.dataset.id)),
                     group_ids: figs.map((f) => f.dataset.isnew ? null : Number(f.dataset.chosen)) };
      if (fresh.length) body.new_name = fresh[0];
      const fixed = figs.filter((f) => f.classList.contains("wrong")).length;
      act("/api/review/accept", body, (d) => "reviewed " + d.reviewed + " image(s), " + fixed + " corrected");
    }
    on("#accept", accept);
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.target.closest("input, select, textarea, button")) { ev.preventDefault(); accept(); }
    });
  }
  if ($("#indexstate")) say("the search index is being built; choose the image again in a moment", false);
})();
