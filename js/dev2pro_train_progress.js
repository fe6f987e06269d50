// Shows the training step, loss and speed on Dev2ProTrainLoRA nodes while they run.
// The server sends "dev2pro.train.step" after every optimizer step (nodes/train_nodes.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "Dev2ProTrainLoRA";

function formatSeconds(s) {
  if (!isFinite(s)) return "?";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function statusLine(d) {
  const left = (d.total - d.step) * d.seconds_per_step;
  return `step ${d.step}/${d.total} · loss ${d.loss.toFixed(4)} · ${d.seconds_per_step.toFixed(2)} s/step · ${formatSeconds(left)} left`;
}

app.registerExtension({
  name: "dev2pro.TrainProgress",

  async setup() {
    api.addEventListener("dev2pro.train.step", ({ detail }) => {
      // In subgraphs the id is a path ("12:5"); the node on the canvas carries the last part.
      const id = String(detail.node).split(":").pop();
      const node = app.graph?.getNodeById(Number(id)) ?? app.graph?.getNodeById(id);
      if (!node) return;
      node.dev2proStatus = statusLine(detail);
      node.setDirtyCanvas(true, false);
    });
    api.addEventListener("execution_start", () => {
      for (const node of app.graph?._nodes ?? []) {
        if (node.type === TRAIN_NODE) node.dev2proStatus = null;
      }
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = draw?.apply(this, arguments);
      if (this.dev2proStatus && !this.flags?.collapsed) {
        ctx.save();
        ctx.font = "12px monospace";
        ctx.fillStyle = "#9c9";
        ctx.fillText(this.dev2proStatus, 8, this.size[1] - 8);
        ctx.restore();
      }
      return result;
    };
  },
});
