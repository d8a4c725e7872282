"""Batch runs through ComfyUI's queue API (`python -m sonic batch`).

A submitting machine needs no GPU stack: nothing in this package imports torch, numpy or ComfyUI. It talks to
ComfyUI servers only over HTTP and WebSocket, and to object storage through boto3 (an optional extra).

- `jobs`: the jobs file (.csv / .jsonl), its validation and the binding of each job to the workflow
- `comfy_api`: one ComfyUI server: uploads, prompts followed on the websocket, outputs through /view
- `storage`: where inputs come from and outputs go (local folder or s3://)
- `manifest`: the audit record of finished jobs, which also makes a batch resumable
- `runner`: the scheduler over several servers: shallow queues, retries, progress, Ctrl-C
"""
