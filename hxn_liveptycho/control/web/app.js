// Live view: follows serve's server-sent events and swaps pictures when a run's snapshot changes.
"use strict";

const token = new URLSearchParams(window.location.search).get("token");
// The token stays in this page's requests (EventSource cannot send a header) but leaves the
// address bar, so it is not in the history, a bookmark or a shared link.
if (token) {
  window.history.replaceState(null, "", window.location.pathname);
}
const withToken = (url) => (token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : url);
const shown = {}; // picture kind -> "uid/version" on screen

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function describe(run) {
  const expected = run.expected_positions ?? "?";
  const error = run.error_metric == null ? "" : `, data mismatch ${Number(run.error_metric).toPrecision(4)}`;
  const why = run.error || (run.status === "complete" ? "" : run.reason);
  const warned = run.warnings ? ` (${run.warnings.length} warning${run.warnings.length > 1 ? "s" : ""})` : "";
  const reason = (why ? ` — ${why}` : "") + warned;
  return `${run.status}: ${run.positions}/${expected} positions, iteration ${run.iteration}${error}${reason}`;
}

function showPictures(run) {
  for (const figure of document.querySelectorAll("#pictures figure")) {
    const kind = figure.dataset.kind;
    if (kind === "mosaic") figure.hidden = !run.has_mosaic;
    if ("quality" in figure.dataset) figure.hidden = !run.has_quality;
    if (figure.hidden || !run.version) continue;
    const wanted = `${run.uid}/${run.version}`;
    if (shown[kind] === wanted) continue;
    const img = figure.querySelector("img");
    const next = new Image();
    next.onload = () => {
      img.src = next.src;
      img.dataset.version = wanted;
      shown[kind] = wanted;
    };
    next.src = withToken(`api/runs/${run.uid}/images/${kind}.png?v=${encodeURIComponent(run.version)}`);
  }
}

// The convergence flag of the latest snapshot (recon.quality.convergence): the rule and its
// numbers, so the scientist reads why, not only the verdict.
function describeConvergence(convergence) {
  if (!convergence) return "";
  const window = `${convergence.window} iterations`;
  if (convergence.rate == null) return `(convergence: too early, under ${window})`;
  const percent = (100 * convergence.rate).toPrecision(2);
  const verdict = convergence.converged ? "converged" : "still improving";
  return `(${verdict}: ${percent} % per iteration over ${window})`;
}

// The half-set resolution estimate of the latest snapshot (recon.live_resolution), when
// live_quality.resolution is on: the half-period where the two halves' FRC falls below the
// half-bit threshold, in nm when the pixel size is known, else in object pixels.
function describeResolution(resolution) {
  if (!resolution) return "";
  const how = "(half-set FRC, half-bit)";
  if (!resolution.estimated) return `resolution: not yet resolved ${how}`;
  if (resolution.resolved_to_nyquist) {
    const pixel = resolution.pixel_size_nm == null ? "" : ` (${Number(resolution.pixel_size_nm).toPrecision(3)} nm)`;
    return `resolution: resolved to the pixel${pixel} ${how}`;
  }
  const value =
    resolution.half_period_nm == null
      ? `${Number(resolution.half_period_px).toPrecision(3)} pixels`
      : `${Number(resolution.half_period_nm).toPrecision(3)} nm`;
  return `resolution ≈ ${value} ${how}`;
}

function showRuns(runs) {
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(
    ...runs.map((run) => {
      const row = document.createElement("tr");
      const cells = [
        run.scan_id,
        run.uid.slice(0, 8),
        run.status,
        `${run.positions}/${run.expected_positions ?? "?"}`,
        run.iteration,
        run.error_metric == null ? "" : Number(run.error_metric).toPrecision(4),
      ];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.textContent = value ?? "";
        row.append(cell);
      }
      const link = document.createElement("td");
      if (run.tiled_url) {
        const a = document.createElement("a");
        a.href = run.tiled_url;
        a.textContent = run.container_path.split("/").pop();
        link.append(a);
      }
      row.append(link);
      row.classList.add(run.status);
      return row;
    }),
  );
}

// The newest series (ptycho-tomography): its projections by angle and the sinogram of one
// row of its phase stack, which grows by a line as each projection ends.
let sinogramShown = "";

function seriesVersion(series) {
  return `${series.series_id}/${series.stacked}/${document.getElementById("sinogram-row").value}`;
}

function showSinogram(series) {
  const wanted = seriesVersion(series);
  if (!series.stacked || sinogramShown === wanted) return;
  const row = document.getElementById("sinogram-row").value;
  const next = new Image();
  next.onload = () => {
    const img = document.getElementById("sinogram");
    img.src = next.src;
    img.dataset.version = wanted;
    sinogramShown = wanted;
  };
  const id = encodeURIComponent(series.series_id);
  next.src = withToken(`api/series/${id}/sinogram.png?row=${row}&v=${series.stacked}`);
}

function showSeries(series) {
  const section = document.getElementById("series");
  section.hidden = !series;
  if (!series) return;
  const angles = series.projections.map((p) => p.angle_deg).filter((a) => a != null);
  const range = angles.length ? `, ${Math.min(...angles)}° to ${Math.max(...angles)}°` : "";
  text("series-title", `Series ${series.series_id}`);
  text("series-progress", `${series.stacked} of ${series.projections.length} projections stacked${range}`);
  const body = document.querySelector("#projections tbody");
  body.replaceChildren(
    ...series.projections.map((p) => {
      const row = document.createElement("tr");
      const seed = p.probe_seed_from ? p.probe_seed_from.slice(0, 8) : "its data";
      for (const value of [p.angle_deg, p.scan_id, p.raw_uid.slice(0, 8), p.status, seed]) {
        const cell = document.createElement("td");
        cell.textContent = value ?? "";
        row.append(cell);
      }
      row.classList.add(p.status);
      return row;
    }),
  );
  showSinogram(series);
}

let lastSeries = null;
document.getElementById("sinogram-row").addEventListener("input", (event) => {
  text("sinogram-row-value", `${Math.round(100 * event.target.value)} %`);
  if (lastSeries) showSinogram(lastSeries);
});

function update(state) {
  const run = state.runs.find((r) => r.uid === state.current);
  showRuns(state.runs);
  lastSeries = state.series;
  showSeries(state.series);
  if (!run) return;
  text("run-title", `Scan ${run.scan_id} (${run.uid.slice(0, 8)})`);
  text("run-progress", describe(run));
  text("run-convergence", describeConvergence(run.convergence));
  text("run-resolution", describeResolution(run.resolution));
  showPictures(run);
}

function connect() {
  const source = new EventSource(withToken("api/events"));
  source.onopen = () => text("connection", "live");
  source.onmessage = (message) => update(JSON.parse(message.data));
  source.addEventListener("closing", () => {
    text("connection", "serve is shutting down");
    source.close();
  });
  source.onerror = () => text("connection", "reconnecting…"); // EventSource retries by itself
}

// Serve workers sharing one Redis (several `liveptycho serve` on one stream): who is alive
// and which runs each holds. Shown only when there are several (or Redis is configured).
const WORKERS_POLL_MS = 3000;

function showWorkers(view) {
  const section = document.getElementById("workers");
  section.hidden = !view.redis;
  if (section.hidden) return;
  text("workers-redis", `Runs claimed in Redis ${view.redis}; this page is worker ${view.this}.`);
  section.querySelector("tbody").replaceChildren(
    ...view.workers.map((worker) => {
      const row = document.createElement("tr");
      const runs = (worker.runs || []).map((r) => `${r.scan_id} ${r.status}`).join(", ");
      const cells = [
        worker.name + (worker.name === view.this ? " (this)" : ""),
        worker.alive ? "alive" : worker.state === "stopped" ? "stopped" : "dead",
        `${worker.heartbeat_age_s} s ago`,
        runs,
      ];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.textContent = value ?? "";
        row.append(cell);
      }
      if (!worker.alive) row.classList.add("failed");
      return row;
    }),
  );
}

async function pollWorkers() {
  try {
    const reply = await fetch(withToken("api/workers"));
    if (reply.ok) showWorkers(await reply.json());
  } catch (error) {
    // the page's connection badge already says when serve is away
  }
  setTimeout(pollWorkers, WORKERS_POLL_MS);
}

connect();
pollWorkers();
