"""The Sonic engine: networks, weights, sampling and decoding (torch; never ComfyUI).

- `pipeline`: one generation as stages, `prepare` -> `sample` -> `decode`
- `sampler`: the Karras schedule, the v-prediction Euler step, shifted circular windows
- `loader`, `checkpoints`, `download`: building the networks, reading and checking the weights, fetching them
- `encoders`: the VAE and image-encoder interfaces (diffusers, transformers or ComfyUI's own behind them)
- `memory`: working memory of each stage (measured)
- `plan`: the run plan: batched call, low-VRAM rows or UNet streaming, for every front end
- `offload`: UNet block streaming
- `models/`: the networks themselves (`nn.Module`s only)
"""
