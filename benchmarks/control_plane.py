"""Control-plane benchmark: how many submits (POST /v1/videos) and status reads (GET /v1/videos/{id}) per second
the API answers, and at what latency, on SQLite and on Redis, with one and with two `wanserve api` processes.

Everything runs on this machine over loopback: the job store, the API processes, stand-in workers that drain
the queue (`python -m wanserve.standin`: they sleep per step, so the store sees the claims, lease renewals,
progress writes and completions of real workers), and a bounded load generator (a fixed number of
keep-alive clients in one asyncio loop, a fixed time per phase). No GPU and no model are involved.

    .venv/bin/python benchmarks/control_plane.py            # writes benchmarks/results/control-plane-<date>.json

The load generator shares the CPU with everything it measures; on a small machine the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

MODEL = "tiny-t2v"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Options:
    duration: float = 10.0  # seconds measured per phase (submit, then status)
    warmup: float = 1.0  # seconds run before each phase's measurement starts, not counted
    clients: int = 16  # concurrent keep-alive clients, spread evenly over the API processes
    workers: int = 2  # stand-in workers draining the queue
    step_seconds: float = 0.05  # each stand-in step sleeps this long
    steps: int = 10  # denoising steps per submitted job: a job holds a worker steps × step_seconds
    stores: tuple[str, ...] = ("sqlite", "redis")
    api_counts: tuple[int, ...] = (1, 2)
    # Redis cells: this many clients poll job statuses while Redis answers nothing (SIGSTOP), for `duration`.
    outage_clients: int = 200
    out: Path = RESULTS
    seed: int = 0


@dataclass
class Figures:
    requests: int = 0  # measured (after warm-up) and answered 200 (during an outage: 200 or 503)
    errors: int = 0  # measured and answered anything else, or failed to connect
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)

    def summarise(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        if ordered:
            self.p50_ms = round(_quantile(ordered, 0.50) * 1000, 2)
            self.p99_ms = round(_quantile(ordered, 0.99) * 1000, 2)
            self.mean_ms = round(sum(ordered) / len(ordered) * 1000, 2)
        self.rps = round(self.requests / self.seconds, 1) if self.seconds else 0.0
        data = asdict(self)
        del data["latencies"]
        return data


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list."""
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


# ---- processes --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """The processes of one benchmark cell; every one is stopped when the cell ends, even on error."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process for its lifetime
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append((name, process))
        return process

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop_all(self) -> None:
        for _, process in reversed(self.running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _, process in reversed(self.running):
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def wait_http_ok(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} was not ready at {url} within {timeout:g} s")


def start_redis(procs: Processes, data: Path) -> str:
    """A redis-server as operations.md configures it: append-only file, fsync every second."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)")
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    process = procs.start("redis", args)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(redis.exceptions.RedisError):
                if client.ping():
                    return f"redis://127.0.0.1:{port}/0"
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{procs.log('redis')}")
            time.sleep(0.05)
    finally:
        client.close()


def base_env(store_url: str, storage_dir: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANSERVE_")}
    env.update(
        WANSERVE_STORE=store_url,
        WANSERVE_STORAGE=f"file://{storage_dir}",
        WANSERVE_DATA_DIR=str(data_dir),
        WANSERVE_MODEL=MODEL,
        # Every accepted job stays in the store for the whole cell: a 429 would measure the limit, not the store.
        WANSERVE_QUEUE_LIMIT="1000000",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# ---- load -------------------------------------------------------------------------------------------------------


async def _phase(
    urls: list[str], op: str, options: Options, ids: list[str], rng: random.Random
) -> tuple[Figures, list[str]]:
    """`options.clients` clients, each with one keep-alive connection to one API process, send `op` back to back
    for warm-up + duration seconds. Returns the measured figures and the ids of every job submitted."""
    figures, submitted = Figures(), []
    start = time.perf_counter()
    measure_from = start + options.warmup
    end = measure_from + options.duration

    async def client(index: int) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=urls[index % len(urls)], timeout=30, limits=limits) as http:
            n = 0
            while (began := time.perf_counter()) < end:
                n += 1
                try:
                    if op == "submit":
                        body = {"model": MODEL, "prompt": f"client {index} job {n}", "seed": n}
                        response = await http.post("/v1/videos", json={**body, "num_inference_steps": options.steps})
                    else:
                        response = await http.get(f"/v1/videos/{rng.choice(ids)}")
                    # During an outage a 503 is the right answer: how soon it comes is what is measured.
                    ok = response.status_code == 200 or (op == "outage" and response.status_code == 503)
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - began
                if ok and op == "submit":
                    submitted.append(response.json()["id"])
                if began >= measure_from:
                    if ok:
                        figures.requests += 1
                        figures.latencies.append(took)
                    else:
                        figures.errors += 1

    await asyncio.gather(*(client(i) for i in range(options.clients)))
    figures.seconds = options.duration
    return figures, submitted


def _counts(store_url: str) -> dict[str, int]:
    from wanserve.jobs import JobStatus, every_job, open_store

    store = open_store(store_url)
    try:
        counts = {status.value: 0 for status in JobStatus}
        for job in every_job(store):
            counts[job.status.value] += 1
        return {"jobs": sum(counts.values()), **counts}
    finally:
        store.close()


def run_cell(store_kind: str, api_count: int, options: Options, workdir: Path) -> dict[str, Any]:
    procs = Processes(workdir)
    try:
        if store_kind == "redis":
            store_url = start_redis(procs, workdir / "redis")
        else:
            # The product's SQLite settings (WAL, synchronous=FULL, BEGIN IMMEDIATE), one file for every process.
            store_url = f"sqlite:///{workdir / 'jobs.db'}"
        storage = workdir / "videos"
        # Started together so their start-ups overlap, then each waited for; "ready" means the store answers.
        urls: list[str] = []
        started: list[tuple[str, str, subprocess.Popen[bytes]]] = []  # (name, ready URL, process)
        for n in range(api_count):
            port = free_port()
            env = base_env(store_url, storage, workdir / f"data-api-{n}")
            args = [sys.executable, "-m", "wanserve", "api", "--port", str(port)]
            urls.append(f"http://127.0.0.1:{port}")
            started.append((f"api-{n}", f"{urls[-1]}/ready", procs.start(f"api-{n}", args, env)))
        for n in range(options.workers):
            port = free_port()
            env = base_env(store_url, storage, workdir / f"data-worker-{n}", WANSERVE_OPS_PORT=str(port))
            args = [sys.executable, "-m", "wanserve.standin", MODEL, str(options.step_seconds)]
            started.append((f"worker-{n}", f"http://127.0.0.1:{port}/ready", procs.start(f"worker-{n}", args, env)))
        for name, url, process in started:
            wait_http_ok(url, process, name)

        rng = random.Random(options.seed)
        load_before = os.getloadavg()
        submit, ids = asyncio.run(_phase(urls, "submit", options, [], rng))
        if not ids:
            raise RuntimeError(f"no job was accepted:\n{procs.log('api-0')}")
        before_status = _counts(store_url)
        status, _ = asyncio.run(_phase(urls, "status", options, ids, rng))
        after_status = _counts(store_url)
        load_after = os.getloadavg()
        outage = None
        if store_kind == "redis" and options.outage_clients:
            redis_server = next(process for name, process in procs.running if name == "redis")
            redis_server.send_signal(signal.SIGSTOP)  # takes connections, answers nothing
            try:
                # Measured from 6 s on: past the store's 5 s timeout, by which the API has found Redis down.
                polls = replace(options, clients=options.outage_clients, warmup=6.0)
                outage, _ = asyncio.run(_phase(urls, "outage", polls, ids, rng))
            finally:
                redis_server.send_signal(signal.SIGCONT)
        cell = {
            "store": store_kind,
            "api_processes": api_count,
            "submit": submit.summarise(),
            "status": status.summarise(),
            # What the status phase read: queued jobs also compute their queue position.
            "jobs_at_status_start": before_status,
            "jobs_at_end": after_status,
            "load_average_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        }
        if outage is not None:
            # Status polls while Redis answers nothing: a 503 each, after how long (requests: 200s and 503s).
            cell["status_during_outage"] = {"clients": options.outage_clients, **outage.summarise()}
        return cell
    finally:
        procs.stop_all()


# ---- machine ----------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def machine() -> dict[str, Any]:
    redis_server = shutil.which("redis-server")
    redis_version = None
    if redis_server is not None:
        text = subprocess.run([redis_server, "--version"], capture_output=True, text=True, timeout=10).stdout
        redis_version = next((part[2:] for part in text.split() if part.startswith("v=")), text.strip())
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wanserve": _version("wanserve"),
        "redis_server": redis_version,
        "redis_py": _version("redis"),
        "sqlite": sqlite3.sqlite_version,
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
        "httpx": _version("httpx"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str]) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=defaults.duration, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="unmeasured seconds before each phase")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent keep-alive clients")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="stand-in workers draining the queue")
    parser.add_argument("--step-seconds", type=float, default=defaults.step_seconds, help="stand-in step length")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="steps per submitted job")
    parser.add_argument("--stores", default=",".join(defaults.stores), help="sqlite,redis")
    parser.add_argument("--apis", default=",".join(map(str, defaults.api_counts)), help="API process counts: 1,2")
    parser.add_argument(
        "--outage-clients",
        type=int,
        default=defaults.outage_clients,
        help="clients polling through a Redis outage in each Redis cell (0: no outage phase)",
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="results directory")
    args = parser.parse_args(argv)
    # Checked before any server starts; `not x > 0` also refuses nan, which every comparison lets through.
    if not math.isfinite(args.duration) or not args.duration > 0:
        parser.error(f"--duration: must be a positive number of seconds, got {args.duration:g}")
    for flag, value in (("--warmup", args.warmup), ("--step-seconds", args.step_seconds)):
        if not math.isfinite(value) or not value >= 0:
            parser.error(f"{flag}: must be 0 or more seconds, got {value:g}")  # a negative step fails every job
    if args.clients < 1 or args.workers < 0 or args.steps < 1:
        parser.error("--steps must be positive, --clients at least 1, --workers 0 or more")
    if args.outage_clients < 0:
        parser.error(f"--outage-clients: 0 (no outage phase) or more, got {args.outage_clients}")
    stores = tuple(s.strip() for s in args.stores.split(",") if s.strip())
    if not stores or set(stores) - {"sqlite", "redis"}:
        parser.error("--stores: a comma-separated subset of sqlite,redis")
    counts = [n.strip() for n in args.apis.split(",") if n.strip()]
    if not counts or not all(n.isascii() and n.isdigit() and int(n) >= 1 for n in counts):
        parser.error(f"--apis: a comma-separated list of API process counts of 1 or more (1,2), got {args.apis!r}")
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        clients=args.clients,
        workers=args.workers,
        step_seconds=args.step_seconds,
        steps=args.steps,
        stores=stores,
        api_counts=tuple(int(n) for n in counts),
        outage_clients=args.outage_clients,
        out=args.out,
    )


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wanserve-control-plane-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str]) -> None:
    options = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    report: dict[str, Any] = {
        "benchmark": "control-plane",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/control_plane.py", *argv]),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "cells": [],
    }
    for store_kind in options.stores:
        for api_count in options.api_counts:
            with _workdir() as workdir:
                cell = run_cell(store_kind, api_count, options, workdir)
            report["cells"].append(cell)
            s, g = cell["submit"], cell["status"]
            print(
                f"{store_kind:6} api×{api_count}: submit {s['rps']:7.1f}/s p50 {s['p50_ms']:6.1f} ms "
                f"p99 {s['p99_ms']:6.1f} ms ({s['errors']} errors) | status {g['rps']:7.1f}/s "
                f"p50 {g['p50_ms']:6.1f} ms p99 {g['p99_ms']:6.1f} ms ({g['errors']} errors) | "
                f"{cell['jobs_at_end'].get('failed', 0)} jobs failed",
                flush=True,
            )
            if "status_during_outage" in cell:
                o = cell["status_during_outage"]
                print(
                    f"{'':6} api×{api_count}: {o['clients']} clients polling through a Redis outage: "
                    f"{o['requests']} answered, p50 {o['p50_ms']:.1f} ms p99 {o['p99_ms']:.1f} ms "
                    f"({o['errors']} errors or timeouts)",
                    flush=True,
                )
    report["seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / f"control-plane-{started.date().isoformat()}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
