"""The broker is only a doorbell: a message carries one job's database id and nothing else; the job database says
what the job is, whether it may run now, and who holds it. Losing a message loses nothing (the reconciler rings
again), a message delivered twice runs nothing twice (the claim is conditional), a forged one can only ring for a
job that exists.

Celery settings (spec: scale-notes, Celery's and the brokers' documentation):
- `task_acks_late` + `worker_prefetch_multiplier=1`, one process per ComfyUI server: a worker holds one message,
  never a backlog that idle workers cannot reach;
- a redelivered message (Redis after SONIC_VISIBILITY_TIMEOUT, RabbitMQ after its `consumer_timeout` or a dropped
  connection) finds its job running under a live lease and runs nothing: the timeout no longer needs to exceed the
  longest job;
- a message is acknowledged whatever its task did (the database holds the job's state, not the broker).
Broker credentials come from the flag or SONIC_BROKER_URL and are never printed (`safe_url`).
"""

from __future__ import annotations

import os

QUEUE = "sonic"
TASK = "sonic.run_job"
DEFAULT_VISIBILITY_TIMEOUT_S = 3600


def broker_url(flag: str | None) -> str:
    url = flag or os.environ.get("SONIC_BROKER_URL")
    if not url:
        raise ValueError("give --broker (e.g. redis://:password@queue-host:6379/0, rediss:// for TLS, or "
                         "amqp://user:password@queue-host//) or set SONIC_BROKER_URL")
    return url


def safe_url(url: str) -> str:
    """The broker's URL with its password masked, for messages and logs."""
    from kombu.utils.url import maybe_sanitize_url

    return ";".join(maybe_sanitize_url(part) for part in url.split(";"))  # sentinel:// lists several URLs


def visibility_timeout_s() -> int:
    text = os.environ.get("SONIC_VISIBILITY_TIMEOUT", str(DEFAULT_VISIBILITY_TIMEOUT_S))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"SONIC_VISIBILITY_TIMEOUT must be whole seconds, got {text!r}") from None
    if value < 1:
        raise ValueError(f"SONIC_VISIBILITY_TIMEOUT must be positive, got {value}")
    return value


def soft_shutdown_s() -> float:
    text = os.environ.get("SONIC_SOFT_SHUTDOWN_SECONDS", "30")
    try:
        return max(float(text), 0.0)
    except ValueError:
        raise ValueError(f"SONIC_SOFT_SHUTDOWN_SECONDS must be seconds, got {text!r}") from None


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
        task_acks_on_failure_or_timeout=True,  # the job's state is in the database; the message was only a bell
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": timeout, "unacked_restore_interval": min(10, timeout),
                                  "unacked_restore_throttle": 1},
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # a second Ctrl-C / SIGQUIT (cold shutdown) still gives the running job this long before the process ends;
        # a job cut off then comes back when its lease lapses
        worker_soft_shutdown_timeout=soft_shutdown_s(),
    )
    return app


def check_broker(app, url: str) -> None:
    """Connect once, now: a wrong address or password is one line before anything is uploaded or recorded."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=10)
    except Exception as exc:  # noqa: BLE001 (kombu raises many kinds; all mean the same to the user)
        reason = " ".join(str(exc).split())[:300]
        raise ConnectionError(f"the broker {safe_url(url)} is unreachable ({type(exc).__name__}: {reason}); "
                              "check --broker / SONIC_BROKER_URL (address, password, TLS)") from None


def ring(app, job_ids: list[int]) -> None:
    """One message per job id (raises when the broker does not take them; nothing is marked rung then)."""
    if not job_ids:
        return
    with app.producer_or_acquire() as producer:
        for job_id in job_ids:
            app.send_task(TASK, args=[job_id], queue=QUEUE, producer=producer)


def waiting(app) -> int | None:
    """Messages waiting in the queue (all batches): 0 for a queue nobody declared yet, None when the broker does
    not answer."""
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            channel = connection.default_channel
            try:
                return channel.queue_declare(QUEUE, passive=True).message_count
            except Exception:  # noqa: BLE001 (a queue that does not exist, or Redis's empty list: nothing waits)
                return 0
    except Exception:  # noqa: BLE001 (the database alone still tells the batch's state)
        return None
