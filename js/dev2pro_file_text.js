// Shows what Save LoRA wrote and what Load LoRA read (the nodes' ui.text) under the node's widgets.
import { app } from "../../scripts/app.js";

const NODES = new Set(["Dev2ProSaveLoRA", "Dev2ProLoadLoRA"]);
const MAX_LINES = 4;
const MAX_CHARS = 110;

app.registerExtension({
  name: "dev2pro.FileText",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      executed?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      this.dev2proText = text.split("\n").slice(0, MAX_LINES)
        .map((l) => (l.length > MAX_CHARS ? l.slice(0, MAX_CHARS - 1) + "…" : l));
      const needed = 30 + 16 * this.dev2proText.length + this.computeSize()[1];
      if (this.size[1] < needed) this.setSize([this.size[0], needed]);
      this.setDirtyCanvas(true, false);
    };
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = draw?.apply(this, arguments);
      if (this.dev2proText?.length && !this.flags?.collapsed) {
        ctx.save();
        ctx.font = "12px monospace";
        ctx.fillStyle = "#9c9";
        const lines = this.dev2proText;
        lines.forEach((line, i) => ctx.fillText(line, 8, this.size[1] - 8 - 16 * (lines.length - 1 - i)));
        ctx.restore();
      }
      return result;
    };
  },
});
