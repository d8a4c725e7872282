"""The client toolkit shared by batch runs and the fleet (no torch, numpy or ComfyUI: a submitting machine needs
no GPU stack). It talks to ComfyUI servers only over HTTP and WebSocket, and to object storage through boto3.

- `jobsfile`: the jobs file (.csv / .jsonl), its validation and the binding of each job to the workflow
- `comfy_api`: one ComfyUI server: uploads, prompts followed on the websocket, outputs through /view
- `storage`: where inputs come from and outputs go (local folder or s3://)
- `manifest`: the audit record of finished jobs, which also makes a batch resumable
- `sonic_nodes.json`: a snapshot of this pack's node schema (`/object_info`), for checks without a server
"""
