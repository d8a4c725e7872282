// ComfyUI's frontend gives the audio upload button its player widget ("audioUI") only for its own audio
// nodes; without it a custom node with `audio_upload` cannot be created. Give Sonic Load Audio the same
// player, placed before the upload button (the button's widget looks the player up when it is built).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "SonicPortrait.AudioUpload",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "SonicLoadAudio") return;
    const { upload, audioUI, ...rest } = nodeData.input.required;
    nodeData.input.required = { ...rest, audioUI: audioUI ?? ["AUDIO_UI", {}], ...(upload ? { upload } : {}) };
  },
});
