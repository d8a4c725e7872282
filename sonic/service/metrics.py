"""The service process's Prometheus counters (its own registry): what this process did, store requests and webhook
deliveries. Jobs by state, run time and queue wait are read from the job database at scrape time (`/metrics` in
app.py), so they are the same whichever process (service, worker) ran the jobs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()
STORE_REQUESTS = Counter("sonic_store_requests", "object store requests by this process", ["operation", "outcome"],
                         registry=REGISTRY)  # operation: put, get, copy, delete, presign; outcome: ok, error
WEBHOOK_DELIVERIES = Counter("sonic_webhook_deliveries", "webhook delivery attempts", ["outcome"],
                             registry=REGISTRY)  # outcome: delivered, retry, failed, refused
SECONDS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600)  # buckets of the job run time and queue wait histograms
