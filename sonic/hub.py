"""The Hugging Face Hub repositories of the released files: where the model download fetches them and what error
messages link to."""

SONIC_REPO = "LeonJoe13/Sonic"  # Sonic's UNet and audio MLPs, RIFE, the YOLOv5m face detector
SVD_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"  # the VAE, the CLIP image encoder, configs (gated)
WHISPER_REPO = "openai/whisper-tiny"

SONIC_URL = f"https://huggingface.co/{SONIC_REPO}"
SVD_URL = f"https://huggingface.co/{SVD_REPO}"
WHISPER_URL = f"https://huggingface.co/{WHISPER_REPO}"
