"""`python -m sonic serve`: the HTTP front door for platforms, on the job database (`sonic.jobdb`).

- `app`: the FastAPI application (JSON under /v1, API keys per tenant, idempotent job creation, a tenant sees
  only its own jobs), /healthz, /metrics (Prometheus), /openapi.json
Jobs are run by `sonic worker`s (fleet mode: `--broker`); nothing here imports torch or ComfyUI.
"""
