// diskferry: small enhancements on top of pages that work without scripts.
// 1. Live job progress over server-sent events. 2. Keyboard navigation in file listings.
"use strict";

function fmtBytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return i ? n.toFixed(1) + " " + u[i] : Math.round(n) + " B";
}

function followJob(box) {
  if (box.dataset.running !== "true" || !window.EventSource) return;
  const id = box.dataset.job;
  const $ = (s) => document.getElementById(s);
  const es = new EventSource("/api/jobs/" + id + "/events");
  es.onmessage = (m) => {
    const e = JSON.parse(m.data);
    const p = e.progress || e;
    const done = p.overall_done ?? p.done, total = p.overall_total ?? p.total;
    if (e.state) { $("job-state").textContent = e.state; $("job-state").className = "state " + e.state; }
    if (total > 0) {
      const pct = e.state === "succeeded" ? 100 : (100 * done) / total;
      $("job-progress").value = pct;
      $("job-percent").textContent = pct.toFixed(1) + " %";
    }
    if (e.state === "succeeded") { $("job-progress").value = 100; $("job-percent").textContent = "100.0 %"; }
    if (p.phase) $("job-phase").textContent = p.phase;
    if (p.machines) showMachines(p.machines);
    if (p.rate !== undefined) $("job-rate").textContent = fmtBytes(p.rate) + "/s";
    if (p.eta_s !== undefined) $("job-eta").textContent = p.eta_s === null ? "—" : Math.round(p.eta_s) + " s";
    if (e.log_tail) {
      // Append the lines this page has not shown yet (the event carries the newest ones).
      const log = $("job-log");
      const shown = Number(log.dataset.lines || 0);
      const fresh = Math.min(e.log_lines - shown, e.log_tail.length);
      if (fresh > 0) {
        log.textContent += e.log_tail.slice(-fresh).join("\n") + "\n";
        log.dataset.lines = String(e.log_lines);
      }
    }
    if (["succeeded", "failed", "cancelled", "interrupted"].includes(e.state)) {
      es.close();
      const cancel = $("job-cancel");
      if (cancel) cancel.hidden = true;
      setTimeout(() => location.reload(), 300);
    }
  };
  es.onerror = () => { es.close(); setTimeout(() => location.reload(), 2000); };
}

// A multicast job's per-machine rows (rendered by the page, updated here).
function showMachines(machines) {
  const table = document.getElementById("job-machines");
  if (!table) { location.reload(); return; }
  for (const m of machines) {
    const row = Array.from(table.querySelectorAll("tbody tr")).find((r) => r.dataset.machine === m.name);
    if (!row) continue;
    const phase = row.querySelector(".phase span");
    phase.textContent = m.phase; phase.className = "state " + m.phase;
    row.querySelector("progress").value = m.total > 0 ? (100 * m.done) / m.total : 0;
    row.querySelector(".delivery").textContent = m.delivery || "";
    row.querySelector(".error").textContent = m.error || "";
  }
}

// j/k or arrows move through rows, Enter opens, Backspace or h goes up a directory.
function keynav(table) {
  const rows = () => Array.from(table.querySelectorAll("tbody tr")).filter((r) => r.querySelector("a"));
  let at = -1;
  const show = (i) => {
    const r = rows();
    if (!r.length) return;
    at = Math.max(0, Math.min(i, r.length - 1));
    r.forEach((row, j) => row.classList.toggle("focus", j === at));
    r[at].querySelector("a").focus();
  };
  document.addEventListener("keydown", (ev) => {
    if (ev.target.matches("input, select, textarea") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "j" || ev.key === "ArrowDown") { show(at + 1); ev.preventDefault(); }
    else if (ev.key === "k" || ev.key === "ArrowUp") { show(at - 1); ev.preventDefault(); }
    else if (ev.key === "Backspace" || ev.key === "h") {
      const up = table.querySelector("a.up");
      if (up) { location.href = up.href; ev.preventDefault(); }
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.getElementById("job");
  if (job) followJob(job);
  const files = document.querySelector("table[data-keynav]");
  if (files) keynav(files);
});
