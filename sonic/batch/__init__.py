"""Batch runs through ComfyUI's queue API (`python -m sonic batch`): `runner` schedules the jobs of a jobs file
over several servers (shallow queues, retries, progress, Ctrl-C, resume). Jobs, the server client, storage and the
manifest are `sonic.jobs`. Nothing here imports torch, numpy or ComfyUI."""
