"""Load on `python -m sonic serve` (not a test): N queued jobs, then C concurrent clients for S seconds on loopback.
Most clients poll GET /v1/jobs/{id} in a loop, a share hold the job's event stream (GET /v1/jobs/{id}/events, SSE)
open and reconnect when it ends, some list GET /v1/jobs?limit=20. Per request type: count, errors (non-2xx,
exceptions), p50/p90/p99 latency of the answered requests (SSE: time to the first event), and the CPU the service
and this client used (they share the machine).

    python benchmarks/service_load.py [--clients 200] [--seconds 60] [--jobs 20] [--sse-share 0.2] [--list-share 0.1]
        [--interval 0] [--database URL | --postgres] [--out benchmarks/results/service_load_<db>.json]
    python benchmarks/service_load.py --url http://host:8080 --key sk_... --tenant NAME   # a running service

Without --url it starts the service here (--no-executor: the jobs stay queued, nothing runs; a SQLite file in a
temporary folder unless --database, or a throwaway PostgreSQL from tests/servers.py with --postgres) and reads its
log afterwards for 5xx and tracebacks (the folder stays, with the log). The jobs' inputs are store keys under
inputs/<tenant>/ that need not exist.
--interval 0 is a closed loop (each client sends its next request as soon as the last one is answered): the
throughput the service reaches, with latency = clients / throughput; --interval 2 is the upload page's polling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"poll": "GET /v1/jobs/{id}", "list": "GET /v1/jobs?limit=20", "sse": "SSE /v1/jobs/{id}/events (first event)"}


class Tally:
    """One request type: answered requests' latencies, errors by status code or exception."""

    def __init__(self):
        self.latencies_s: list[float] = []
        self.errors: Counter = Counter()
        self.events = self.keepalives = self.streams_ended = 0

    def summary(self, seconds: float) -> dict:
        ordered = sorted(self.latencies_s)

        def percentile(p: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000, 1) if ordered else None

        return {"count": len(ordered), "per_s": round(len(ordered) / seconds, 1), "errors": sum(self.errors.values()),
                "errors_by_kind": dict(self.errors), "p50_ms": percentile(50), "p90_ms": percentile(90),
                "p99_ms": percentile(99), "max_ms": round(ordered[-1] * 1000, 1) if ordered else None,
                **({"events": self.events, "keepalives": self.keepalives, "streams_ended": self.streams_ended}
                   if self.events or self.keepalives or self.streams_ended else {})}


# -- the clients -------------------------------------------------------------------------------------------------
async def poll(client, tally: Tally, path: str, interval_s: float) -> None:
    import httpx

    await asyncio.sleep(random.uniform(0, interval_s))  # clients that poll on a timer do not start in step
    while True:
        start = time.perf_counter()
        try:
            response = await client.get(path)
            if 200 <= response.status_code < 300:
                tally.latencies_s.append(time.perf_counter() - start)
            else:
                tally.errors[str(response.status_code)] += 1
        except httpx.HTTPError as exc:
            tally.errors[type(exc).__name__] += 1
        if interval_s:
            await asyncio.sleep(interval_s)


async def follow(client, tally: Tally, path: str) -> None:
    """An EventSource: open the stream, time the first event, read until it ends, open it again."""
    import httpx

    while True:
        start, first = time.perf_counter(), True
        try:
            async with client.stream("GET", path, timeout=httpx.Timeout(30, read=60)) as response:
                if response.status_code != 200:
                    tally.errors[str(response.status_code)] += 1
                    await response.aread()
                    await asyncio.sleep(1)  # a browser's EventSource waits before it retries
                    continue
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        if first:
                            tally.latencies_s.append(time.perf_counter() - start)
                            first = False
                        tally.events += 1
                    elif line.startswith(": keep-alive"):
                        tally.keepalives += 1
            tally.streams_ended += 1
        except httpx.HTTPError as exc:
            tally.errors[type(exc).__name__] += 1
            await asyncio.sleep(1)


async def load(url: str, key: str, job_ids: list[str], args) -> tuple[dict[str, Tally], float]:
    import httpx

    tallies = {kind: Tally() for kind in KINDS}
    sse_clients = round(args.clients * args.sse_share)
    list_clients = round(args.clients * args.list_share)
    # A pool of its own for each client (one keep-alive connection, as a browser tab's): httpx looks for a free
    # connection by scanning its pool, and one pool of 200 cost this client ~8 ms of CPU a request on 2 cores.
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(30),
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
               for _ in range(args.clients)]
    tasks = []
    for n, client in enumerate(clients):
        job = job_ids[n % len(job_ids)]
        if n < sse_clients:
            tasks.append(follow(client, tallies["sse"], f"/v1/jobs/{job}/events"))
        elif n < sse_clients + list_clients:
            tasks.append(poll(client, tallies["list"], "/v1/jobs?limit=20", args.interval))
        else:
            tasks.append(poll(client, tallies["poll"], f"/v1/jobs/{job}", args.interval))
    running = [asyncio.ensure_future(task) for task in tasks]
    start = time.perf_counter()
    await asyncio.sleep(args.seconds)
    elapsed = time.perf_counter() - start
    for task in running:  # requests still in flight are counted neither way
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    for client in clients:
        await client.aclose()
    return tallies, elapsed


# -- the service ---------------------------------------------------------------------------------------------------
class LocalService:
    """`sonic serve --no-executor` on a loopback port, its log in `folder`."""

    def __init__(self, folder: Path, database: str):
        self.folder, self.database = folder, database
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = folder / "service.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen([sys.executable, "-m", "sonic", "serve", "--listen", f"127.0.0.1:{port}",
                                         "--database", database, "--store", str(folder / "store"), "--no-executor"],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=folder)
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"sonic serve did not start: {self.log_path.read_text()[-3000:]}") from None
                time.sleep(0.2)

    def key(self, tenant: str) -> str:
        made = subprocess.run([sys.executable, "-m", "sonic", "serve", "keys", "create", "--tenant", tenant,
                               "--database", self.database], capture_output=True, text=True, env=self.env,
                              check=True)
        return dict(line.split(": ", 1) for line in made.stdout.splitlines())["api_key"]

    def cpu_s(self) -> float:
        return cpu_s([self.process.pid])

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def problems(self) -> dict:
        text = self.log_path.read_text(errors="replace")
        lines = text.splitlines()
        answered_5xx = sum(1 for line in lines if '" 5' in line and "HTTP/1.1" in line)
        return {"log": str(self.log_path), "responses_5xx": answered_5xx,
                "tracebacks": text.count("Traceback (most recent call last)"),
                "error_lines": [line for line in lines if line.startswith(("ERROR", "WARNING"))][:20]}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def cpu_s(pids: list[int], reaped: bool = False) -> float:
    """User + system CPU seconds of these processes; `reaped`: with their children that exited (a postmaster's
    backends)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(field) for field in fields[11:15 if reaped else 13])  # utime stime [cutime cstime]
    return total / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s(postgres) -> float:
    postmaster = postgres.process.pid
    return cpu_s([postmaster], reaped=True) + cpu_s([pid for pid in postgres.pids() if pid != postmaster])


def postgres_sessions(postgres) -> int:
    """Sessions opened on the benchmark's database so far (pg_stat_database, PostgreSQL 14+)."""
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user={postgres.USER} dbname={postgres.DATABASE}") as c:
        return c.execute("select sessions from pg_stat_database where datname = %s", (postgres.DATABASE,)).fetchone()[0]


def create_jobs(url: str, key: str, tenant: str, count: int) -> list[str]:
    ids = []
    for n in range(count):
        body = {"image": f"inputs/{tenant}/2026/12/06/portrait-{n}.png",
                "audio": f"inputs/{tenant}/2026/12/06/speech-{n}.wav", "params": {"seed": n}}
        request = urllib.request.Request(url + "/v1/jobs", data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            ids.append(json.loads(response.read())["id"])
    return ids


def table(result: dict) -> str:
    rows = [f"{'request':<40} {'count':>7} {'req/s':>7} {'errors':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"]
    for kind, label in KINDS.items():
        row = result["requests"][kind]
        rows.append(f"{label:<40} {row['count']:>7} {row['per_s']:>7} {row['errors']:>7} {row['p50_ms'] or '-':>8} "
                    f"{row['p90_ms'] or '-':>8} {row['p99_ms'] or '-':>8}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--sse-share", type=float, default=0.2, help="share of the clients that hold event streams")
    parser.add_argument("--list-share", type=float, default=0.1, help="share of the clients that list jobs")
    parser.add_argument("--interval", type=float, default=0, help="seconds a client waits between its requests")
    parser.add_argument("--database", help="the job database of the service started here (default: SQLite)")
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL (tests/servers.py)")
    parser.add_argument("--url", help="a running service instead of one started here")
    parser.add_argument("--key", help="with --url: an API key")
    parser.add_argument("--tenant", help="with --url: the key's tenant (its inputs/<tenant>/ keys)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.url and not (args.key and args.tenant):
        parser.error("--url needs --key and --tenant")
    folder = Path(tempfile.mkdtemp(prefix="sonic-load-"))
    postgres, service = None, None
    try:
        if args.url:
            url, key, tenant, database = args.url.rstrip("/"), args.key, args.tenant, "remote:"
        else:
            database = args.database or f"sqlite:///{folder / 'jobs.db'}"
            if args.postgres:
                sys.path.insert(0, str(ROOT / "tests"))
                from servers import PostgreSQL

                postgres = PostgreSQL(folder / "postgres").start()
                database = postgres.url
            service = LocalService(folder, database)
            url, tenant = service.url, "bench"
            key = service.key(tenant)
        job_ids = create_jobs(url, key, tenant, args.jobs)
        print(f"{args.jobs} jobs on {url} ({database.split(':', 1)[0]}); {args.clients} clients for {args.seconds:g} s",
              flush=True)
        server_cpu = service.cpu_s() if service else None
        if postgres:
            database_cpu, sessions = postgres_cpu_s(postgres), postgres_sessions(postgres)
        own, load_before = resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()[0]
        tallies, elapsed = asyncio.run(load(url, key, job_ids, args))
        after = resource.getrusage(resource.RUSAGE_SELF)
        result = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},  # before, after
            "database": database.split(":", 1)[0], "clients": args.clients, "seconds": round(elapsed, 2),
            "jobs": args.jobs, "sse_clients": round(args.clients * args.sse_share),
            "list_clients": round(args.clients * args.list_share), "interval_s": args.interval,
            "requests": {kind: tally.summary(elapsed) for kind, tally in tallies.items()},
            "client_cpu_s": round(after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime, 1)}
        if service:
            result["service_cpu_s"] = round(service.cpu_s() - server_cpu, 1)
            result["service_peak_rss_mib"] = service.peak_rss_mib()
            result["service_still_healthy"] = service.process.poll() is None
        if postgres:  # each connection is a backend process of its own
            result["postgres_cpu_s"] = round(postgres_cpu_s(postgres) - database_cpu, 1)
            result["postgres_sessions_opened"] = postgres_sessions(postgres) - sessions - 1  # less our own
        if service:
            service.stop()
            result["service_log"] = service.problems()
            service = None
        print(table(result))
        print(f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the run")
        print(f"CPU over {elapsed:.0f} s: service {result.get('service_cpu_s', '?')} s, this client "
              f"{result['client_cpu_s']} s ({os.cpu_count()} cores)"
              + (f", PostgreSQL {result['postgres_cpu_s']} s; "
                 f"{result['postgres_sessions_opened']} connections opened during the run" if postgres else ""))
        sse = result["requests"]["sse"]
        print(f"SSE: {sse['count']} streams opened, {sse.get('events', 0)} events, {sse.get('keepalives', 0)} "
              f"keep-alives, {sse.get('streams_ended', 0)} ended by the service")
        if "service_log" in result:
            log = result["service_log"]
            print(f"service log {log['log']}: {log['responses_5xx']} 5xx responses, {log['tracebacks']} tracebacks")
        out = args.out or ROOT / "benchmarks" / "results" / f"service_load_{result['database'].split('+')[0]}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"-> {out}")
    finally:
        if service:
            service.stop()
        if postgres:
            postgres.close()


if __name__ == "__main__":
    main()
