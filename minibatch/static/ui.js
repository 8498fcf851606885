// minibatch dashboard: live progress. Every element with data-batch-id that holds a
// [data-test="progress"] bar follows its batch: /ui/live answers the status and counters
// of the batches not yet ended, once a second. A batch page reloads when its batch ends,
// to show its results, errors and deliveries. No inline script, no eval (the CSP).
"use strict";
(function () {
  const POLL_MS = 1000;
  const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);

  function statusOf(el) {
    const status = el.querySelector('[data-test="status"]');
    return status ? status.textContent.trim() : "";
  }

  function update(el, batch) {
    const bar = el.querySelector('[data-test="progress"]');
    bar.dataset.done = batch.done;
    bar.dataset.total = batch.total;
    bar.max = batch.total || 1;
    bar.value = batch.done;
    const text = el.querySelector('[data-test="progress-text"]');
    if (text) text.textContent = batch.done + " / " + batch.total;
    const status = el.querySelector('[data-test="status"]');
    if (status && status.textContent !== batch.status) {
      status.textContent = batch.status;
      status.className = "status " + batch.status;
    }
    for (const cell of el.querySelectorAll("[data-metric]")) {
      const name = cell.dataset.metric;
      const value = name === "total" ? batch.total : batch.metrics[name];
      if (value !== undefined) cell.textContent = value;
    }
    if (el.dataset.terminal === "false" && TERMINAL.has(batch.status)) {
      window.location.reload();
    }
  }

  async function poll() {
    const open = Array.from(document.querySelectorAll("[data-batch-id]")).filter(
      (el) => el.querySelector('[data-test="progress"]') && !TERMINAL.has(statusOf(el)));
    if (open.length === 0) return;  // nothing left to follow on this page
    const query = open.map((el) => "id=" + encodeURIComponent(el.dataset.batchId)).join("&");
    try {
      const response = await fetch("/ui/live?" + query, {headers: {accept: "application/json"}});
      if (response.status === 401) {
        window.location.assign("/ui/login");
        return;
      }
      if (response.ok) {
        const found = (await response.json()).batches;
        for (const el of open) {
          const batch = found[el.dataset.batchId];
          if (batch) update(el, batch);
        }
      }
    } catch (err) {
      // the server is restarting or the network dropped: try again at the next tick
    }
    window.setTimeout(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => window.setTimeout(poll, POLL_MS));
})();
