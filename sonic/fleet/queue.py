"""The Celery app. Broker and store settings come from flags or the environment, never from jobs.

Settings for multi-minute GPU jobs (spec: scale-notes, Celery's and the brokers' documentation):
- `task_acks_late`: a job is acknowledged after its output is stored and its record written, so a worker killed at
  any moment leaves the job unacknowledged and the broker delivers it again;
- `worker_prefetch_multiplier=1` and one process per ComfyUI server: a worker holds one job, never a backlog;
- `task_reject_on_worker_lost`: a job whose process died is requeued, not acknowledged;
- Redis: an unacknowledged job is redelivered after `visibility_timeout` seconds (SONIC_VISIBILITY_TIMEOUT,
  default 7200). It must be longer than the longest job, or a job still running is handed to a second worker
  (the job stays correct, see `work`, but the GPU time is wasted); a killed worker's job waits that long before
  another worker gets it.
- RabbitMQ: an unacknowledged job returns as soon as the worker's connection closes; raise the broker's
  `consumer_timeout` (30 min by default) above the longest job.
"""

from __future__ import annotations

import os

QUEUE = "sonic"
TASK = "sonic.run_job"
DEFAULT_VISIBILITY_TIMEOUT_S = 7200


def broker_url(flag: str | None) -> str:
    url = flag or os.environ.get("SONIC_BROKER_URL")
    if not url:
        raise ValueError("give --broker (e.g. redis://queue-host:6379/0 or amqp://user@queue-host//) "
                         "or set SONIC_BROKER_URL")
    return url


def visibility_timeout_s() -> int:
    text = os.environ.get("SONIC_VISIBILITY_TIMEOUT", str(DEFAULT_VISIBILITY_TIMEOUT_S))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"SONIC_VISIBILITY_TIMEOUT must be whole seconds, got {text!r}") from None
    if value < 1:
        raise ValueError(f"SONIC_VISIBILITY_TIMEOUT must be positive, got {value}")
    return value


def make_app(broker: str):
    try:
        from celery import Celery
    except ImportError:
        raise RuntimeError("the fleet needs Celery: pip install 'sonic-portrait[fleet]'") from None
    app = Celery("sonic", broker=broker, set_as_current=False)
    timeout = visibility_timeout_s()
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=False,  # a task that raised is not acknowledged: the job is not lost
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,  # records live in the object store: they outlive the workers and the broker
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": timeout, "unacked_restore_interval": min(10, timeout)},
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
