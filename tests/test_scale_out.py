"""Scale-out with real processes and no mocks: `wanserve api` replicas and `wanserve worker`s as separate
processes on one real redis-server (and once on one SQLite file), all sharing one local storage directory.

What the split deployment promises: no job is lost when a worker dies (`kill -9`) or is stopped (SIGTERM),
none is completed twice, a dead worker's job goes back to the queue within about a lease, and queue
positions stay consistent while 1,000 jobs drain through 4 workers.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from wanserve.jobs import Job, JobStatus, JobStore, open_store
from wanserve.jobs.redis_store import RedisJobStore

from service import Process, base_env, free_port, wait_for, wait_ready
from videos import decode_mp4

MODEL = "tiny-t2v"
LEASE = 3.0  # WANSERVE_LEASE_SECONDS from base_env
REAP_EVERY = LEASE / 3  # every worker reaps expired leases this often (worker.py)
# What a loaded 2-core box adds to a timing bound (scheduling delays, a busy Redis): added, never multiplied.
SLACK = 2.0
# The real tiny engine, about 1.5 s a job on one core: long enough to be caught mid-denoise, short enough
# that 20 jobs drain through 2 workers in well under a minute.
# Long enough for a poll every 0.1 s to see it mid-denoise (10-60 %) on a fast machine: 48 steps ran in 0.4 s.
CHAOS_REQUEST = {"width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 150}
COMPLETED_LINE = re.compile(r"job (video_[0-9a-f]+) completed in")


# ---- processes ------------------------------------------------------------------------------------------------


class StandInProcess(Process):
    """`python -m wanserve.standin MODEL STEP_SECONDS`: a worker process whose engine sleeps per step."""

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wanserve.standin", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class Api:
    process: Process
    url: str
    http: httpx.Client  # keep-alive: one connection per client, as a real SDK client holds

    def submit(self, model: str = MODEL, **fields: Any) -> str:
        response = self.http.post("/v1/videos", json={"model": model, "prompt": "a fox in the snow", **fields})
        assert response.status_code == 200, response.text
        return str(response.json()["id"])


@dataclass
class WorkerProcess:
    process: Process
    ops_url: str

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def holds(self, job: Job) -> bool:
        # Worker ids are host:pid:model:random (worker.new_worker_id).
        return job.worker_id is not None and job.worker_id.split(":")[1] == str(self.pid)

    def sigterm(self) -> None:
        assert self.process.proc is not None
        self.process.proc.send_signal(signal.SIGTERM)

    def completed_ids(self) -> list[str]:
        return COMPLETED_LINE.findall(self.process.log_path.read_text(errors="replace"))


class Cluster:
    """The processes one test starts, on one store and one shared storage directory; all killed at the end."""

    def __init__(self, tmp: Path, cache: Path, store_url: str) -> None:
        self.tmp, self.cache, self.store_url = tmp, cache, store_url
        self.videos = tmp / "videos"  # every API replica and worker reads and writes here
        self.processes: list[Process] = []
        self.apis: list[Api] = []
        self.workers: list[WorkerProcess] = []
        self.store: JobStore = open_store(store_url)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return base_env(
            self.cache,
            WANSERVE_STORE=self.store_url,
            WANSERVE_STORAGE=f"file://{self.videos}",
            WANSERVE_DATA_DIR=str(self.tmp / f"data-{name}"),  # nothing lands in the working directory
            # Two torch workers share two cores. Torch's default of one thread per core in each process
            # oversubscribes them: 60 steps took 33 s instead of 3 s here.
            OMP_NUM_THREADS="1",
            **extra,
        )

    def api(self, name: str, models: tuple[str, ...] = (MODEL,), **env: str) -> Api:
        port = free_port()
        args = ["api", "--port", str(port)]
        for model in models:
            args += ["--model", model]
        process = Process(args, self.env(name, **env), self.tmp / f"{name}.log")
        self.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        api = Api(process, url, httpx.Client(base_url=url, timeout=30))
        self.apis.append(api)
        return api

    def worker(self, name: str, **env: str) -> WorkerProcess:
        port = free_port()
        args = ["worker", "--model", MODEL, "--ops-port", str(port)]
        process = Process(args, self.env(name, **env), self.tmp / f"{name}.log")
        return self._add_worker(process, port)

    def stand_in(self, name: str, model: str, step_seconds: float, **env: str) -> WorkerProcess:
        port = free_port()
        env = {"WANSERVE_OPS_PORT": str(port), **env}
        process = StandInProcess([model, str(step_seconds)], self.env(name, **env), self.tmp / f"{name}.log")
        return self._add_worker(process, port)

    def _add_worker(self, process: Process, ops_port: int) -> WorkerProcess:
        self.processes.append(process)
        worker = WorkerProcess(process, f"http://127.0.0.1:{ops_port}")
        self.workers.append(worker)
        return worker

    def wait_ready(self, timeout: float = 120) -> None:
        """All processes were started at once (their start-ups overlap); wait for each to answer /ready."""
        for api in self.apis:
            wait_ready(api.url, api.process, timeout)
        for worker in self.workers:
            wait_ready(worker.ops_url, worker.process, timeout)

    def logs(self) -> str:
        return "\n".join(f"==== {p.log_path.name}\n{p.log()}" for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        for api in self.apis:
            api.http.close()
        self.store.close()


@contextmanager
def cluster_of(tmp: Path, cache: Path, store_url: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp, cache, store_url)
    try:
        yield cluster
    except BaseException:
        print(cluster.logs())  # pytest shows captured output with the failure
        raise
    finally:
        cluster.close()


# ---- observing the store --------------------------------------------------------------------------------------


class EventLog:
    """Every state change the Redis store publishes on its events channel, with the time it arrived."""

    def __init__(self, url: str, channel: str = "wanserve:events") -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(channel)
        # Live before returning: an event published before the server processed SUBSCRIBE would be missed.
        deadline = time.monotonic() + 10
        while (message := self.pubsub.get_message(timeout=0.5)) is None or message["type"] != "subscribe":
            assert time.monotonic() < deadline, "no subscribe confirmation within 10 s"
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="events", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "message":
                self.events.append((time.monotonic(), json.loads(message["data"])))

    def first(self, job_id: str, status: str, after: float) -> float | None:
        """When `job_id` first reached `status` after the monotonic time `after`, or None."""
        for at, event in list(self.events):
            if at > after and event["id"] == job_id and event["status"] == status:
                return at
        return None

    def completions(self) -> Counter[str]:
        return Counter(event["id"] for _, event in list(self.events) if event["status"] == "completed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


class JobWatcher:
    """Polls one job every 20 ms and keeps each change of (status, worker): works on any store."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.changes: list[tuple[float, float, JobStatus, str | None]] = []  # (monotonic, wall, status, worker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            job = self.store.get(self.job_id)
            state = (job.status, job.worker_id)
            if not self.changes or self.changes[-1][2:] != state:
                self.changes.append((time.monotonic(), time.time(), *state))
            if job.status.finished:
                return

    def first(self, predicate: Callable[[JobStatus, str | None], bool]) -> tuple[float, float] | None:
        """(monotonic, wall) of the first change matching predicate(status, worker_id)."""
        for mono, wall, status, worker in list(self.changes):
            if predicate(status, worker):
                return mono, wall
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def running_job(store: JobStore, ids: list[str], worker: WorkerProcess) -> str | None:
    """A job `worker` is denoising, early enough (10-60 %) that it is still running when we act on it."""
    for job_id in ids:
        job = store.get(job_id)
        mid_denoise = job.stage == "denoise" and 0.1 <= job.progress <= 0.6
        if job.status == JobStatus.IN_PROGRESS and worker.holds(job) and mid_denoise:
            return job_id
    return None


def wait_finished(store: JobStore, ids: list[str], timeout: float) -> dict[str, Job]:
    done: dict[str, Job] = {}

    def all_done() -> bool:
        for job_id in ids:
            if job_id not in done and (job := store.get(job_id)).status.finished:
                done[job_id] = job
        return len(done) == len(ids)

    wait_for(all_done, timeout, f"{len(ids)} jobs to finish", interval=0.2)
    return done


# ---- kill -9 -------------------------------------------------------------------------------------------------


def kill_a_worker_mid_job(cluster: Cluster, n_jobs: int, events: EventLog | None) -> None:
    """Submit round-robin through every API replica, kill -9 the first worker in the middle of one of its
    jobs, and check that every job completes exactly once and the killed one is redelivered in time."""
    store, apis = cluster.store, cluster.apis
    victim, survivors = cluster.workers[0], cluster.workers[1:]
    ids = [apis[n % len(apis)].submit(seed=n, **CHAOS_REQUEST) for n in range(n_jobs)]

    killed_id = wait_for(lambda: running_job(store, ids, victim), 60, "a job mid-denoise on the victim")
    watcher = JobWatcher(store, killed_id)
    killed_at = time.monotonic()
    victim.process.kill9()
    # Still in progress under the dead worker: it really was killed mid-job, not after completing.
    held = store.get(killed_id)
    assert held.status == JobStatus.IN_PROGRESS and victim.holds(held), held

    jobs = wait_finished(store, ids, timeout=120)
    watcher.close()

    # Nothing lost: every job completed, with its video in the shared storage, readable through any replica.
    assert {job_id: job.status for job_id, job in jobs.items()} == dict.fromkeys(ids, JobStatus.COMPLETED)
    for n, job_id in enumerate(ids):
        other = apis[(n + 1) % len(apis)]  # not the replica that accepted it
        content = other.http.get(f"/v1/videos/{job_id}/content")
        assert content.status_code == 200 and content.content[4:8] == b"ftyp", (job_id, content.status_code)
    assert decode_mp4(cluster.videos / killed_id / "video.mp4").frames.shape == (9, 64, 64, 3)

    # Nothing done twice: the store let exactly one worker complete each job, and only the killed one ran twice.
    logged = Counter(job_id for worker in cluster.workers for job_id in worker.completed_ids())
    assert logged == Counter(ids), "completions logged by the workers"
    if events is not None:
        wait_for(lambda: events.completions() == Counter(ids), 10, "one completed event per job")
    assert {job_id: job.attempts for job_id, job in jobs.items()} == {i: 2 if i == killed_id else 1 for i in ids}
    killed = jobs[killed_id]
    assert any(worker.holds(killed) for worker in survivors)

    # Redelivered in time. The lease was last renewed before the kill, so it ran out within LEASE of it, and a
    # worker reaps at least every REAP_EVERY, busy or not.
    requeued = watcher.first(lambda status, worker: status == JobStatus.QUEUED or worker != held.worker_id)
    reclaimed = watcher.first(lambda status, worker: status == JobStatus.IN_PROGRESS and worker != held.worker_id)
    assert requeued is not None and reclaimed is not None, watcher.changes
    print(
        f"killed job: back in the queue after {requeued[0] - killed_at:.2f} s, claimed again after "
        f"{reclaimed[0] - killed_at:.2f} s (lease {LEASE:g} s)"
    )
    assert requeued[0] - killed_at <= LEASE + REAP_EVERY + SLACK, f"back in the queue after {requeued[0] - killed_at}"
    # A survivor takes it once its own job ends: at most one job's length later.
    longest_job = max(job.completed_at - job.started_at for job in jobs.values() if job.completed_at and job.started_at)
    waited = reclaimed[0] - killed_at
    assert waited <= LEASE + REAP_EVERY + longest_job + SLACK, f"claimed again after {waited:.1f} s"
    # It regained its old place at the head of the queue: no job waiting when it came back started before it.
    assert killed.started_at is not None
    overtook = [
        i for i, job in jobs.items() if i != killed_id and requeued[1] < (job.started_at or 0) < killed.started_at
    ]
    assert not overtook, f"{overtook} started before the redelivered job"


@pytest.mark.timeout(240)
def test_kill_9_of_a_worker_mid_job_on_redis_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_cache: Path, redis_url: str
) -> None:
    with cluster_of(tmp_path, tiny_cache, redis_url) as cluster:
        events = EventLog(redis_url)
        try:
            cluster.api("api-1")
            cluster.api("api-2")
            cluster.worker("worker-1")
            cluster.worker("worker-2")
            cluster.wait_ready()
            kill_a_worker_mid_job(cluster, 20, events)
        finally:
            events.close()


@pytest.mark.timeout(180)
def test_kill_9_of_a_worker_mid_job_on_one_sqlite_file_shared_by_processes(tmp_path: Path, tiny_cache: Path) -> None:
    # Four slashes: an absolute path. The API and both workers open the same file; SQLite's write lock
    # (BEGIN IMMEDIATE) is what keeps two processes from claiming one job.
    store_url = f"sqlite:///{tmp_path / 'queue' / 'jobs.db'}"
    with cluster_of(tmp_path, tiny_cache, store_url) as cluster:
        cluster.api("api")
        cluster.worker("worker-1")
        cluster.worker("worker-2")
        cluster.wait_ready()
        # A standalone worker's own series exist at zero from the start too (it counts what it runs).
        scrape = httpx.get(f"{cluster.workers[0].ops_url}/metrics", timeout=10).text
        for status in ("completed", "failed", "cancelled"):
            assert f'wanserve_jobs_finished_total{{model="{MODEL}",status="{status}"}} 0.0' in scrape, status
        kill_a_worker_mid_job(cluster, 8, events=None)


# ---- SIGTERM -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_sigterm_mid_job_hands_the_job_back_or_finishes_it_and_exits_0(
    tmp_path: Path, tiny_cache: Path, redis_url: str
) -> None:
    with cluster_of(tmp_path, tiny_cache, redis_url) as cluster:
        events = EventLog(redis_url)
        try:
            api = cluster.api("api")
            quick = cluster.worker("worker-grace-0", WANSERVE_SHUTDOWN_GRACE="0")
            patient = cluster.worker("worker-grace-20", WANSERVE_SHUTDOWN_GRACE="20")
            cluster.wait_ready()
            store = cluster.store
            ids = [api.submit(seed=n, **CHAOS_REQUEST) for n in range(2)]  # both workers idle: one job each

            # Grace 0: the job goes back to the queue at the next step. (Not waiting for the exit first: with
            # torch loaded, Python's own teardown takes seconds after the hand-back, in which the other worker
            # could have run the job to completion before we looked.)
            returned = wait_for(lambda: running_job(store, ids, quick), 60, "a job mid-denoise on the grace-0 worker")
            signalled = time.monotonic()
            quick.sigterm()
            handed_back_at = wait_for(lambda: events.first(returned, "queued", signalled), 30, "the hand-back")
            # The next step is ~20 ms away; the engine's gc.collect() on the way out takes the rest.
            assert handed_back_at - signalled < 10, f"handed back {handed_back_at - signalled:.1f} s after SIGTERM"

            # Grace 20: the other worker takes the returned job after its own; SIGTERM mid-job lets it finish.
            wait_for(lambda: running_job(store, [returned], patient), 60, "the returned job mid-denoise elsewhere")
            patient_signalled = time.monotonic()
            patient.sigterm()
            assert quick.process.proc is not None and patient.process.proc is not None
            assert quick.process.proc.wait(60) == 0
            assert patient.process.proc.wait(60) == 0
            assert "handed back to the queue" in quick.process.log() and quick.completed_ids() == []
            assert "handed back" not in patient.process.log()

            jobs = wait_finished(store, ids, timeout=10)  # nothing left running: both workers are gone
            assert [jobs[i].status for i in ids] == [JobStatus.COMPLETED] * 2
            assert patient.holds(jobs[returned]) and sorted(patient.completed_ids()) == sorted(ids)
            assert jobs[returned].attempts == 1  # a hand-back does not count against max_attempts
            # Finished after the signal, inside the grace: the drain let it run to the end.
            assert events.first(returned, "completed", patient_signalled) is not None
            wait_for(lambda: events.completions() == Counter(ids), 10, "one completed event per job")
        finally:
            events.close()


# ---- 1,000 jobs ----------------------------------------------------------------------------------------------

STAND_IN_MODELS = ("tiny-t2v", "tiny-t2v-moe")  # two queues, so positions are checked per model
SUBMITTERS = 4


class PositionSampler:
    """Takes atomic snapshots of the queue (one MULTI/EXEC): every known job's status and position, and each
    model's queue length, as of one instant. Positions read one request at a time would see claims happen
    in between, so only a snapshot can show "exactly 1..n, no gaps, no duplicates"."""

    def __init__(self, url: str, ids: list[str], submitted_all: threading.Event) -> None:
        self.store = RedisJobStore(url)
        self.ids, self.submitted_all = ids, submitted_all
        self.snapshots = 0
        self.largest_queue = 0
        self.errors: list[str] = []
        self._finished: set[str] = set()  # a finished job never waits again: no need to read it again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="positions", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        store = self.store
        while not self._stop.wait(0.05) and len(self.errors) < 10:
            complete = self.submitted_all.is_set()  # read before the ids: then the list is final
            known = list(self.ids)
            ids = [i for i in known if i not in self._finished]
            # The store's own position script, run inside a transaction (private members: the store offers
            # positions one call at a time only).
            pipe = store._redis.pipeline(transaction=True)
            for model in STAND_IN_MODELS:
                pipe.zcard(store._key("queue", model))
            for job_id in ids:
                pipe.hmget(store._key("job", job_id), "status", "model")
                store._position(args=[store.prefix, job_id], client=pipe)
            replies = pipe.execute()
            # Queued by EXEC but missing from `known`: accepted since the copy, or still in a submitter's hands.
            unknown_bound = len(self.ids) - len(known) + SUBMITTERS
            lengths = dict(zip(STAND_IN_MODELS, replies[: len(STAND_IN_MODELS)], strict=True))
            positions: dict[str, list[int]] = {model: [] for model in STAND_IN_MODELS}
            for job_id, (status, model), place in zip(
                ids, replies[len(STAND_IN_MODELS) :: 2], replies[len(STAND_IN_MODELS) + 1 :: 2], strict=True
            ):
                if status == "queued":
                    positions[model].append(int(place))
                elif int(place) != 0:
                    self.errors.append(f"{job_id} is {status} but has queue position {place}")
                if status in ("completed", "failed", "cancelled"):
                    self._finished.add(job_id)
            self.snapshots += 1
            for model, places in positions.items():
                self.largest_queue = max(self.largest_queue, lengths[model])
                if complete:
                    if sorted(places) != list(range(1, lengths[model] + 1)):
                        self.errors.append(f"{model}: positions {sorted(places)} of a queue of {lengths[model]}")
                # While submitting, a job can be queued before its id reaches the list: the known ones must
                # still hold distinct places within the queue.
                elif len(set(places)) != len(places) or not all(1 <= p <= lengths[model] for p in places):
                    self.errors.append(f"{model}: positions {sorted(places)} of a queue of {lengths[model]}")
                elif lengths[model] - len(places) > unknown_bound:
                    self.errors.append(f"{model}: {lengths[model]} queued but only {len(places)} known")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.store.close()


class PositionPoller:
    """What a client sees: GET /v1/videos/{id} for a few jobs, over and over. With one priority and nobody
    returned to the queue, a job's position may only go down, and once it has started it never waits again."""

    def __init__(self, url: str, ids: list[str], every: int = 50) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.ids, self.every = ids, every
        self.seen: dict[str, list[int | None]] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="poller", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02) and len(self.errors) < 10:
            for job_id in list(self.ids)[:: self.every]:
                body = self.http.get(f"/v1/videos/{job_id}").json()
                history = self.seen.setdefault(job_id, [])
                place = body["queue_position"] if body["status"] == "queued" else None
                if history and place is not None:
                    if history[-1] is None:
                        self.errors.append(f"{job_id} waits again at {place} after it started: {history}")
                    elif place > history[-1]:
                        self.errors.append(f"{job_id} went back from {history[-1]} to {place}")
                if not history or history[-1] != place:
                    history.append(place)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.http.close()


@pytest.mark.timeout(180)
def test_1000_jobs_through_4_stand_in_workers_on_redis(tmp_path: Path, redis_url: str) -> None:
    total = 1000
    with cluster_of(tmp_path, tmp_path / "cache", redis_url) as cluster:
        events = EventLog(redis_url)
        ids: list[str] = []
        submitted_all = threading.Event()
        sampler: PositionSampler | None = None
        poller: PositionPoller | None = None
        try:
            # A queue limit above the test's size: a 429 here would be the limit working, not a loss.
            api = cluster.api("api", models=STAND_IN_MODELS, WANSERVE_QUEUE_LIMIT=str(total))
            for n in range(4):
                cluster.stand_in(f"stand-in-{n}", STAND_IN_MODELS[n % 2], step_seconds=0.001)
            cluster.wait_ready()
            sampler = PositionSampler(redis_url, ids, submitted_all)
            poller = PositionPoller(api.url, ids)

            started = time.monotonic()
            lock = threading.Lock()

            def submit_share(first: int) -> None:
                with httpx.Client(base_url=api.url, timeout=30) as http:  # one keep-alive connection each
                    for n in range(first, total, SUBMITTERS):
                        body = {"model": STAND_IN_MODELS[n % 2], "prompt": f"job {n}", "num_inference_steps": 2}
                        response = http.post("/v1/videos", json={**body, "seed": n})
                        assert response.status_code == 200, response.text
                        with lock:
                            ids.append(response.json()["id"])

            submitters = [threading.Thread(target=submit_share, args=(n,)) for n in range(SUBMITTERS)]
            for thread in submitters:
                thread.start()
            for thread in submitters:
                thread.join(120)
            submitted_all.set()
            assert len(ids) == total, f"only {len(ids)} of {total} accepted"
            submit_seconds = time.monotonic() - started

            jobs = wait_finished(cluster.store, ids, timeout=90)
            drained_seconds = time.monotonic() - started
            wait_for(lambda: events.completions() == Counter(ids), 15, "one completed event per job")
        finally:
            for observer in (sampler, poller, events):
                if observer is not None:
                    observer.close()
        assert sampler is not None and poller is not None
        print(
            f"{total} jobs: submitted in {submit_seconds:.1f} s, all completed after {drained_seconds:.1f} s; "
            f"{sampler.snapshots} position snapshots, longest queue {sampler.largest_queue}"
        )

        assert {job.status for job in jobs.values()} == {JobStatus.COMPLETED}
        assert all(job.attempts == 1 for job in jobs.values())
        assert all((cluster.videos / job_id / "video.mp4").is_file() for job_id in ids)
        per_worker = [len(worker.completed_ids()) for worker in cluster.workers]
        assert sum(per_worker) == total and all(per_worker), per_worker  # every worker took part
        assert Counter(i for worker in cluster.workers for i in worker.completed_ids()) == Counter(ids)

        assert sampler.errors == [], sampler.errors
        assert poller.errors == [], poller.errors
        # The checks ran while there was a queue to check, not only before or after it.
        assert sampler.snapshots >= 20 and sampler.largest_queue >= 10, (sampler.snapshots, sampler.largest_queue)
        assert len(poller.seen) >= total // 50 // 2
