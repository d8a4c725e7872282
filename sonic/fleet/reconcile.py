"""The reconciler: what makes a crash anywhere lose nothing. One round (run by every worker every
SONIC_RECONCILE_INTERVAL seconds, and by `status --wait`; a database lock lets one of them do it at a time):

1. running jobs whose lease lapsed (their worker died or stopped) go back to queued, and their prompts are
   interrupted on their ComfyUI;
2. queued jobs that are due (new, handed back, lease lapsed, backoff over) and were not rung since are rung;
3. when the broker's queue is empty, claimable jobs whose message is older than SONIC_RECONCILE_GRACE seconds are
   rung again (the broker lost the message, or a worker took it while the database was down).
A job rung twice runs once: the claim is conditional.
"""

from __future__ import annotations

import logging
import os

from .queue import ring, waiting

log = logging.getLogger("sonic.fleet")
BATCH_LIMIT = 5000


def interrupt(prompts: list[tuple[str, str]]) -> None:
    """Stop the prompts of lapsed attempts on their ComfyUI (a dead worker's prompt would render on, unseen), in
    the background: a server that does not answer is gone anyway."""
    import threading

    from ..jobs.comfy_api import ComfyServer

    for server, prompt_id in prompts:
        threading.Thread(target=ComfyServer(server).cancel, args=(prompt_id, 5.0), daemon=True).start()


def reconcile(db, app, holder: str, interval_s: float) -> dict:
    """One round -> what it did ({} when another process holds the round). A round that fails gives the lock up,
    so that a process that cannot reach the broker does not keep the others from reconciling."""
    if not db.try_lock("reconciler", holder, max(2 * interval_s, 5.0)):
        return {}
    try:
        return _round(db, app)
    except Exception:
        try:
            db.unlock("reconciler", holder)
        except Exception:  # noqa: BLE001 (the lock expires by itself)
            pass
        raise


def _round(db, app) -> dict:
    done = {"expired": db.expire_leases(BATCH_LIMIT)}
    if done["expired"]:
        log.warning("reconciler: %d job(s) whose worker stopped renewing its lease go back to the queue",
                    len(done["expired"]))
        interrupt(db.lapsed_prompts(done["expired"]))
    due = db.due(BATCH_LIMIT)
    ring(app, [job_id for job_id, _ in due])
    db.rang(due)
    done["rung"] = [job_id for job_id, _ in due]
    grace = float(os.environ.get("SONIC_RECONCILE_GRACE", "60"))
    if waiting(app) == 0:
        silent = db.silent(grace, BATCH_LIMIT)
        if silent:
            log.warning("reconciler: the broker's queue is empty but %d job(s) wait: ringing again", len(silent))
            ring(app, [job_id for job_id, _ in silent])
            db.rang(silent)
        done["silent"] = [job_id for job_id, _ in silent]
    return done
