// The training panel on Train LoRA and Continue Training: a loss chart that grows every step, step / total, ETA,
// s/step, learning rate, the latest previews with their step, Stop & save, and the saved file at the end.
// Events: "dev2pro.train.step" and "dev2pro.train.status" (nodes/events.py). After a page reload the panel redraws
// from GET /dev2pro/runs/{node} (nodes/routes.py); Stop & save is POST /dev2pro/stop.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINERS = new Set(["Dev2ProTrainLoRA", "Dev2ProContinueTraining"]);
const PANEL_HEIGHT = 300;
const SMOOTHING = 0.9; // exponential moving average of the loss, as TensorBoard's default slider
const SHOWN_PREVIEWS = 4;
const STYLE = `
.dev2pro-panel { box-sizing: border-box; min-height: ${PANEL_HEIGHT - 20}px; display: flex; flex-direction: column; gap: 4px; padding: 4px 6px;
  font: 12px/1.3 monospace; color: #ccc; background: #1c1c1c; border-radius: 6px; overflow: hidden; }
.dev2pro-panel .d2p-stats { color: #9c9; }
.dev2pro-panel .d2p-status { overflow-wrap: anywhere; }
.dev2pro-panel button { white-space: nowrap; }
.dev2pro-panel canvas { width: 100%; flex: 1 1 auto; min-height: 80px; background: #111; border-radius: 4px; }
.dev2pro-panel .d2p-row { display: flex; gap: 8px; align-items: center; }
.dev2pro-panel button { font: inherit; padding: 1px 8px; cursor: pointer; }
.dev2pro-panel button:disabled { cursor: default; opacity: 0.5; }
.dev2pro-panel .d2p-previews { display: flex; gap: 4px; height: 72px; }
.dev2pro-panel .d2p-previews:empty { display: none; }
.dev2pro-panel figure { margin: 0; height: 72px; position: relative; }
.dev2pro-panel figure img { height: 72px; border-radius: 3px; }
.dev2pro-panel figcaption { position: absolute; left: 2px; bottom: 2px; padding: 0 3px; background: #000a;
  color: #fff; font-size: 10px; border-radius: 2px; }
`;

function formatSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function viewUrl(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type });
  return api.apiURL(`/view?${query}`);
}

class TrainingPanel {
  constructor(node) {
    this.node = node;
    this.run = null; // the latest summary: status, step, total, previews, saved, message
    this.losses = []; // [step, loss]
    this.logScale = false;
    this.root = document.createElement("div");
    this.root.className = "dev2pro-panel";
    this.stats = this.add("div", "d2p-stats", "waiting for the run");
    this.canvas = this.add("canvas");
    const row = this.add("div", "d2p-row");
    this.stopButton = document.createElement("button");
    this.stopButton.textContent = "Stop & save";
    this.stopButton.title = "End training after the current step, keep the adapter and run the rest of the graph";
    this.stopButton.disabled = true;
    this.stopButton.addEventListener("click", () => this.stop());
    const log = document.createElement("label");
    log.innerHTML = '<input type="checkbox"> log scale';
    log.querySelector("input").addEventListener("change", (e) => { this.logScale = e.target.checked; this.draw(); });
    row.append(this.stopButton, log);
    this.status = this.add("div", "d2p-status");
    this.previews = this.add("div", "d2p-previews");
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  add(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text) element.textContent = text;
    this.root.append(element);
    return element;
  }

  async stop() {
    this.stopButton.disabled = true;
    this.status.textContent = "stopping after the current step…";
    try {
      const response = await api.fetchApi("/dev2pro/stop", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ node: this.run?.node }),
      });
      const answer = await response.json();
      if (!answer.stopping?.length) this.status.textContent = "this run is not training any more";
    } catch (error) {
      this.status.textContent = `Stop & save failed: ${error}`;
    }
  }

  // a full run from the route: after a reload, or as a (continued) run starts
  load(run) {
    this.losses = (run.losses ?? []).map(([step, loss]) => [step, loss]);
    this.update(run);
  }

  step(d) {
    const last = this.losses[this.losses.length - 1];
    if (!last || d.step > last[0]) this.losses.push([d.step, d.loss]);
    this.update({ ...this.run, ...d, node: this.run?.node ?? d.node });
  }

  update(run) {
    this.run = { ...this.run, ...run };
    const r = this.run;
    const loss = this.losses.length ? this.losses[this.losses.length - 1][1] : null;
    const parts = [`step ${r.step ?? 0}/${r.total ?? "?"}`];
    if (loss !== null) parts.push(`loss ${loss.toFixed(4)}`);
    if (r.seconds_per_step) parts.push(`${r.seconds_per_step.toFixed(2)} s/step`);
    if (r.learning_rate) parts.push(`lr ${r.learning_rate.toExponential(2)}`);
    if (r.status === "running" || r.status === "stopping") parts.push(`${formatSeconds(r.eta_seconds)} left`);
    this.stats.textContent = parts.join(" · ");
    this.stopButton.disabled = r.status !== "running";
    this.status.textContent = this.statusText(r);
    this.status.title = this.status.textContent;
    this.showPreviews(r.previews ?? []);
    this.draw();
  }

  statusText(r) {
    const saved = r.saved?.length ? `saved as ${r.saved.join(", ")}` : "";
    switch (r.status) {
      case "running": return "training";
      case "stopping": return "stopping after the current step…";
      case "stopped": return `${r.message}${saved ? `, ${saved}` : ", the adapter goes on to the next nodes"}`;
      case "finished": return saved ? `${r.message}, ${saved}` : r.message;
      case "cancelled": return r.message;
      case "failed": return `failed: ${r.message}`;
      default: return "";
    }
  }

  showPreviews(previews) {
    const shown = previews.slice(-SHOWN_PREVIEWS);
    const key = shown.map((p) => p.filename).join("|");
    if (key === this.previewKey) return;
    this.previewKey = key;
    this.previews.replaceChildren(...shown.map((p) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = viewUrl(p);
      img.alt = `preview at step ${p.step}`;
      const caption = document.createElement("figcaption");
      caption.textContent = `step ${p.step}`;
      figure.append(img, caption);
      return figure;
    }));
  }

  draw() {
    this.root.dataset.dev2proPanel = String(this.node.id); // a new node gets its id once added to the graph
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) Object.assign(canvas, { width, height });
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const points = this.losses.filter(([, loss]) => isFinite(loss) && (!this.logScale || loss > 0));
    canvas.dataset.points = String(points.length);
    if (points.length < 1) return;
    const y = (loss) => (this.logScale ? Math.log10(loss) : loss);
    const smoothed = [];
    let average = null;
    for (const [step, loss] of points) {
      average = average === null ? loss : SMOOTHING * average + (1 - SMOOTHING) * loss;
      smoothed.push([step, average]);
    }
    const firstStep = this.run?.first_step ?? 0;
    // the x axis grows with the run (a 2000-step axis would squeeze the first minutes into a corner)
    const x0 = Math.min(points[0][0], firstStep + 1), x1 = Math.max(points[points.length - 1][0], x0 + 1);
    let lo = Math.min(...points.map((p) => y(p[1]))), hi = Math.max(...points.map((p) => y(p[1])));
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const pad = 6 * ratio, left = 44 * ratio;
    const px = (step) => left + ((step - x0) / Math.max(1, x1 - x0)) * (width - left - pad);
    const py = (value) => pad + (1 - (y(value) - lo) / (hi - lo)) * (height - 2 * pad);
    ctx.font = `${10 * ratio}px monospace`;
    ctx.fillStyle = "#888";
    const label = (v) => (this.logScale ? `${(10 ** v).toPrecision(2)}` : v.toPrecision(3));
    ctx.fillText(label(hi), 2, pad + 8 * ratio);
    ctx.fillText(label(lo), 2, height - pad);
    const line = (series, color, widthPx) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = widthPx * ratio;
      ctx.beginPath();
      series.forEach(([step, loss], i) => (i ? ctx.lineTo(px(step), py(loss)) : ctx.moveTo(px(step), py(loss))));
      if (series.length === 1) ctx.arc(px(series[0][0]), py(series[0][1]), 2 * ratio, 0, 2 * Math.PI);
      ctx.stroke();
    };
    line(points, "#4a6a8a", 1);
    line(smoothed, "#8cf", 2);
  }
}

function trainerNode(id) {
  // in a subgraph the id is a path ("12:5"); the node on the canvas carries the last part
  const local = String(id).split(":").pop();
  const node = app.graph?.getNodeById(Number(local)) ?? app.graph?.getNodeById(local);
  return node && TRAINERS.has(node.comfyClass ?? node.type) ? node : null;
}

async function fetchRun(panel, nodeId) {
  try {
    const response = await api.fetchApi(`/dev2pro/runs/${encodeURIComponent(nodeId)}`);
    if (response.ok) panel.load(await response.json());
  } catch (error) {
    console.warn("dev2pro: could not fetch the training run", error);
  }
}

async function restoreRuns() {
  try {
    const response = await api.fetchApi("/dev2pro/runs");
    if (!response.ok) return;
    for (const run of (await response.json()).runs ?? []) {
      const node = trainerNode(run.node);
      if (node?.dev2proPanel) await fetchRun(node.dev2proPanel, run.node);
    }
  } catch (error) {
    console.warn("dev2pro: could not fetch the training runs", error);
  }
}

app.registerExtension({
  name: "dev2pro.TrainPanel",

  async setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.append(style);
    api.addEventListener("dev2pro.train.step", ({ detail }) => trainerNode(detail.node)?.dev2proPanel?.step(detail));
    api.addEventListener("dev2pro.train.status", ({ detail }) => {
      const panel = trainerNode(detail.node)?.dev2proPanel;
      if (!panel) return;
      if (detail.status === "running") fetchRun(panel, detail.node); // a new run: its curve so far (continued runs)
      else panel.update(detail);
    });
    api.addEventListener("reconnected", restoreRuns);
    await restoreRuns();
  },

  async afterConfigureGraph() {
    await restoreRuns(); // a workflow opened, or the page reloaded, while training
  },

  async nodeCreated(node) {
    if (!TRAINERS.has(node.comfyClass)) return;
    const panel = new TrainingPanel(node);
    node.dev2proPanel = panel;
    const widget = node.addDOMWidget("dev2pro_training_panel", "dev2pro.panel", panel.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => PANEL_HEIGHT,
      getMaxHeight: () => PANEL_HEIGHT,
      getHeight: () => PANEL_HEIGHT,
    });
    widget.serialize = false; // never a widgets_values entry: saved workflows keep their widget order
    const [width, height] = node.computeSize();
    node.setSize([Math.max(node.size[0], width, 420), Math.max(node.size[1], height)]);
  },
});
