// Sonic Lip-Sync Calibrate sends its measurement in the node's UI message (`lipsync`: offset_s, confidence,
// applied_s, warning, message). Show it on the node itself, under the widgets, in orange when the correction
// was not applied (low confidence or a result at the edge of the search range). The text is not saved with the
// workflow and not sent with prompts.
import { app } from "../../scripts/app.js";

const NAME = "lip-sync result";

function resultWidget(node) {
  const existing = node.widgets?.find((w) => w.name === NAME);
  if (existing) return existing;
  const box = document.createElement("div");
  box.className = "sonic-lipsync-result";
  box.style.cssText = "font: 12px monospace; white-space: pre-wrap; padding: 4px 6px; border-radius: 4px;" +
    "background: rgba(0,0,0,0.25); overflow: auto;";
  const widget = node.addDOMWidget(NAME, "sonic_lipsync_result", box, {
    serialize: false,
    getValue: () => box.textContent,
    setValue: (text) => { box.textContent = text; },
    getMinHeight: () => 84,
  });
  widget.serialize = false; // not part of widgets_values: saved workflows keep their layout
  return widget;
}

export function describe(result) {
  const sign = (v) => (v >= 0 ? "+" : "") + v.toFixed(3);
  return `offset ${sign(result.offset_s)} s   confidence ${result.confidence.toFixed(2)}\n` +
    `applied ${sign(result.applied_s)} s\n${result.message}`;
}

app.registerExtension({
  name: "SonicPortrait.LipSyncResult",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "SonicLipSyncCalibrate") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const result = message?.lipsync?.[0];
      if (!result) return;
      const widget = resultWidget(this);
      widget.value = describe(result);
      widget.element.style.color = result.warning ? "#ffb454" : "#9fe0a8";
      widget.element.dataset.warning = String(result.warning);
      const [w, h] = this.computeSize();
      this.setSize([Math.max(this.size[0], w), Math.max(this.size[1], h)]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
