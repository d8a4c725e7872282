"""The service process's Prometheus counters (its own registry). Job gauges are read from the job database at
scrape time (`/metrics` in app.py); these count what this process did: store requests, webhook deliveries."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
STORE_REQUESTS = Counter("sonic_store_requests", "object store requests by this process", ["operation", "outcome"],
                         registry=REGISTRY)  # operation: put, get, copy, delete, presign; outcome: ok, error
WEBHOOK_DELIVERIES = Counter("sonic_webhook_deliveries", "webhook delivery attempts", ["outcome"],
                             registry=REGISTRY)  # outcome: delivered, retry, failed, refused
JOB_RUN_SECONDS = Histogram("sonic_job_run_seconds", "from a job's last start to its end (jobs ended while this "
                            "process watched)", buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600),
                            registry=REGISTRY)
JOB_QUEUE_SECONDS = Histogram("sonic_job_queue_wait_seconds", "from a job's creation to its first start",
                              buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=REGISTRY)
