"""A fleet of ComfyUI workers fed from a Celery job queue (`python -m sonic submit | worker | status`).

The batch runner (`sonic.batch`) with its scheduler replaced by a distributed engine: Celery with Redis as the
broker (RabbitMQ by changing the broker URL). Jobs, their validation, the queue-API client, object storage and
the manifest are the client toolkit both share (`sonic.jobs`). Nothing here imports torch or ComfyUI.

- `queue`: the Celery app and the settings that make long GPU jobs safe (late acknowledgement, one job per worker,
  redelivery after the visibility timeout)
- `work`: one job on one ComfyUI server, idempotent (a redelivered job never makes a second output), and the
  worker process that stops taking jobs while its ComfyUI is down
- `batches`: submit (inputs to the store, one task per job) and status (records in the store, the queue's state)
- `store`: a batch's folder in the object store, the one place that knows its layout
"""
