"""The networks: plain `nn.Module`s, built from configs and checkpoint shapes (no file handling here)."""
