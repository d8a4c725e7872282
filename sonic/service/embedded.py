"""The service's embedded executor (`sonic serve` without --broker): the fleet's `Worker` for each ComfyUI server,
fed from the job database instead of a broker. The same claims, leases, fencing, retries with backoff, health
pauses and staged outputs as in the fleet; a job that was running when the service stopped comes back when its
lease lapses (the reconciler round here expires it) and runs again."""

from __future__ import annotations

import logging
import socket
import threading

from ..fleet.work import Worker, env_seconds

log = logging.getLogger("sonic.service")
IDLE_S = 0.5  # how often an idle worker looks for due jobs


class Executor:
    def __init__(self, db, store, servers: list[str], lease_s: float | None = None):
        host = socket.gethostname()
        self.db = db
        from ..jobs.jobsfile import Workflow

        self.workers = [Worker(url, store, db, f"embedded-{n + 1}@{host}", lease=lease_s)
                        for n, url in enumerate(servers)]
        for worker in self.workers:  # the model files the service's workflow needs: a ComfyUI without them waits
            worker.standard = Workflow.load(None).prompt
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for worker in self.workers:
            self.threads.append(threading.Thread(target=self.serve, args=(worker,), daemon=True,
                                                 name=f"sonic-{worker.name}"))
            self.threads.append(threading.Thread(target=worker.watch, args=(self.stop,), daemon=True,
                                                 name=f"sonic-health-{worker.name}"))
        self.threads.append(threading.Thread(target=self.reconcile, daemon=True, name="sonic-reconciler"))
        for thread in self.threads:
            thread.start()
        log.info("embedded executor: %s", ", ".join(f"{w.name} -> {w.server.url}" for w in self.workers))

    def close(self, timeout_s: float = 10.0) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout_s)

    def serve(self, worker: Worker) -> None:
        """Take due jobs one at a time (oldest first) while this worker's ComfyUI, the store and the database
        answer; a claim another worker won is skipped."""
        worker.check_health()
        while not self.stop.is_set():
            try:
                if worker.blockers:
                    worker.recheck()
                    self.stop.wait(2.0)
                    continue
                ran = False
                for job_id, _ in self.db.due(limit=8):
                    if self.stop.is_set():
                        return
                    if worker.handle(job_id) != "not taken":
                        ran = True
                        break
                if not ran:
                    self.stop.wait(IDLE_S)
            except Exception as exc:  # noqa: BLE001 (the database may be back in a moment)
                log.warning("%s: %s; trying again in 5 s", worker.name, exc)
                self.stop.wait(5.0)

    def reconcile(self) -> None:
        """Lapsed leases (a stopped service, a worker thread that died) go back to the queue."""
        from ..fleet.reconcile import interrupt

        interval = env_seconds("SONIC_RECONCILE_INTERVAL", 10.0)
        while not self.stop.wait(interval):
            try:
                expired = self.db.expire_leases()
                if expired:
                    log.warning("%d job(s) whose lease lapsed go back to the queue", len(expired))
                    interrupt(self.db.lapsed_prompts(expired))
            except Exception as exc:  # noqa: BLE001
                log.warning("reconciler: %s", exc)
