"""ComfyUI nodes: thin adapters between ComfyUI types and the `sonic` engine.

Importing this module is cheap (no torch): heavy imports happen inside the node functions.
"""

from .comfy import install_examples, register_model_folder, register_routes
from .loaders import SonicLoadAudio, SonicLoadImage
from .model import SonicModelLoader, model_report
from .postprocess import SonicLipSyncCalibrate, SonicSmoothMotion
from .sampling import SonicPreDataNode, SonicSamplerNode
from .video import SonicVideoEncode

register_model_folder()
install_examples()
register_routes(model_report)

NODE_CLASS_MAPPINGS = {
    "SonicLoadImage": SonicLoadImage,
    "SonicLoadAudio": SonicLoadAudio,
    "SonicModelLoader": SonicModelLoader,
    "SonicPreData": SonicPreDataNode,
    "SonicSampler": SonicSamplerNode,
    "SonicLipSyncCalibrate": SonicLipSyncCalibrate,
    "SonicSmoothMotion": SonicSmoothMotion,
    "SonicVideoEncode": SonicVideoEncode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SonicLoadImage": "Sonic Load Image",
    "SonicLoadAudio": "Sonic Load Audio",
    "SonicModelLoader": "Sonic Model Loader",
    "SonicPreData": "Sonic PreData",
    "SonicSampler": "Sonic Sampler",
    "SonicLipSyncCalibrate": "Sonic Lip-Sync Calibrate",
    "SonicSmoothMotion": "Sonic Smooth Motion",
    "SonicVideoEncode": "Sonic Video Encode",
}
