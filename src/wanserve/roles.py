"""The processes wanserve runs: `serve` (API + in-process workers), `api` (stateless HTTP replica) and
`worker` (one model, with a small ops port). Each builds its objects from `Settings`, nothing global."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from typing import Any

from starlette.requests import Request  # at module level: FastAPI resolves the route's annotations here

from wanserve.catalog import ModelSpec, lookup, resolve_spec
from wanserve.config import Settings, process_rank, world_size_from_env
from wanserve.errors import BadSetting, StoreUnavailable, WanserveError
from wanserve.jobs.model import JobStatus

log = logging.getLogger(__name__)


def served_specs(settings: Settings) -> dict[str, ModelSpec]:
    """The served models by canonical name (torch-free, so API replicas can call it)."""
    specs: dict[str, ModelSpec] = {}
    for name in settings.model:
        spec = resolve_spec(name)
        if spec.name in specs:
            raise BadSetting(f"{name!r} names {spec.name}, which is already served", "model")
        specs[spec.name] = spec
        if spec.provisional:
            log.warning(
                "%s is neither a catalog model nor in this machine's Hugging Face cache: requests are checked "
                "against generic defaults (Wan 2.1 text-to-video, 832x480) until a worker here has its files "
                "(an API replica elsewhere: put the repo in its HF cache, or serve a local copy)",
                spec.name,
            )
    return specs


def api_specs(settings: Settings) -> dict[str, ModelSpec]:
    """An API replica's served models, those its workers run on sharding groups marked (`--sharded-model`). Only
    the API reads that setting: a worker given it in a ConfigMap every role reads must still start."""
    specs = served_specs(settings)
    for name in settings.sharded_model:
        try:
            sharded = resolve_spec(name).name
        except BadSetting:
            sharded = name
        if sharded not in specs:
            raise BadSetting(f"{name!r} is not a served model (served: {', '.join(specs)})", "sharded_model")
        specs[sharded] = replace(specs[sharded], sharded=True)
    return specs


def _describe_when_loaded(worker: Any, specs: dict[str, ModelSpec]) -> None:
    """A repo the catalog does not know is described from its files once its worker has them: from then on the
    API checks requests against what the model is (its tasks, defaults, limits), not generic defaults."""
    worker.loaded.wait()
    engine = worker.engine
    if engine is not None and getattr(engine, "spec", None) is not None:
        specs[worker.model] = engine.spec
        log.info("%s described from its files: %s", worker.model, "+".join(sorted(engine.spec.tasks)))


def open_backends(settings: Settings, writes: bool = True) -> tuple[Any, Any]:
    """The job store and the result storage of `settings`. `writes`: this process stores files (the servers,
    `prune --delete`): a local result folder it could not write in is a wrong setting, refused now."""
    from wanserve.jobs import open_store
    from wanserve.storage import local_folder_problem, local_storage_path, open_storage

    # Only when a default under data_dir is used: an API replica on Redis and S3 writes nothing locally, and
    # creating ./data would crash it on a read-only root filesystem (a common container setting).
    if settings.store is None or settings.storage is None:
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file there, a parent that may not be written
            raise BadSetting(
                f"{settings.data_dir} cannot be made a folder: {exc.strerror or exc}", "data_dir"
            ) from None
    # A default under data_dir is named as data_dir, where the user can change it.
    store_key = "store" if settings.store is not None else "data_dir"
    try:
        store = open_store(settings.store_url)
    except ValueError as exc:
        raise BadSetting(str(exc), "store") from None
    except StoreUnavailable:  # a ConnectionError, so an OSError: the store is out of order, not set wrong
        raise
    except OSError as exc:  # the SQLite file's folder cannot be made
        raise BadSetting(f"the job store cannot be opened: {exc.strerror or exc}: {exc.filename}", store_key) from None
    storage_key = "storage" if settings.storage is not None else "data_dir"
    try:
        check = getattr(store, "check_settings", None)
        if check is not None:  # a Redis that answers, but not to this URL (its password, its database number)
            check()
        storage = open_storage(settings.storage_url)
        folder = local_storage_path(settings.storage_url)
        if folder is not None and writes:
            # Refused now, rather than each job running in full and failing to store its video.
            problem = local_folder_problem(folder.absolute())
            if problem is None:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    problem = f"it cannot be made a folder: {exc.strerror or exc}"
            if problem is not None:
                raise BadSetting(f"{folder} cannot hold the videos: {problem}", storage_key)
        if folder is None and writes:
            _check_bucket(storage, settings.storage_url)
    except BaseException as exc:
        store.close()
        if isinstance(exc, ValueError) and not isinstance(exc, BadSetting):  # the storage URL's form
            raise BadSetting(str(exc), "storage") from None
        raise
    return store, storage


def _check_bucket(storage: Any, url: str) -> None:
    """An S3 bucket that does not exist is a wrong setting, refused now: every job ran in full and then failed
    to store its video a minute later. Credentials refused are said, not refused (HeadBucket needs
    s3:ListBucket, which a policy of object rights alone lacks); an endpoint that does not answer is an outage,
    waited out as every storage call does."""
    from wanserve.storage.s3 import BUCKET_MISSING

    try:
        problem = storage.bucket_problem()
    except Exception as exc:
        log.warning("the result storage %s does not answer now (%s); jobs wait for it", url, type(exc).__name__)
        return
    if problem == BUCKET_MISSING:
        raise BadSetting(f"{url}: {problem}", "storage")
    if problem is not None:
        log.error("the result storage %s: %s; jobs cannot store their videos until it is fixed", url, problem)


def check_engine_settings(settings: Settings) -> None:
    """Before any model loads (minutes) or any port opens: a device this machine lacks, a multi-GPU layout
    that does not fit the process group, or a cache folder that cannot hold a tiny model served here (built
    there at start), is a wrong setting. Torch-free unless a CUDA device is named: answered in about a second."""
    from wanserve.engine.device import check_device, check_layout
    from wanserve.storage import local_folder_problem

    check_device(settings.device)
    world_size = world_size_from_env()
    if world_size > 1 or settings.world_layout > 1:
        check_layout(settings, world_size)
    # Only tiny models need the folder: a real one may run from a read-only disk (a models dir, a volume).
    tiny = any((spec := lookup(name)) is not None and spec.tiny for name in settings.model)  # catalog-only
    if tiny and (problem := local_folder_problem(settings.cache_dir.expanduser().absolute())):
        raise BadSetting(f"{settings.cache_dir} cannot hold the tiny model: {problem}", "cache_dir")


def _one_process(role: str) -> None:
    """Under torchrun every rank would open the same port, and all but one would blame "another process"."""
    if world_size_from_env() > 1:
        raise BadSetting(
            f"`wanserve {role}` runs in one process, not under torchrun (WORLD_SIZE is {world_size_from_env()}): "
            "run `wanserve worker` under torchrun, and `wanserve api` on its own beside it (docs/parallelism.md)"
        )


def _check_listen(settings: Settings, port_key: str) -> None:
    """Before any model loads: can this process listen where it is told to? Each address the host resolves to
    is tried as uvicorn binds it (IPv6 sockets IPv6-only); a taken port names the port setting, an address
    this machine does not have names --host."""
    port, host = getattr(settings, port_key), settings.host or None  # "": every address, as uvicorn takes it
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadSetting(f"{settings.host!r} is not an address to listen on: {exc.strerror}", "host") from None
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        try:
            probe = socket.socket(family, kind, proto)
        except OSError as exc:
            if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                continue  # a family this machine lacks (IPv6 turned off): uvicorn skips it too
            raise BadSetting(f"cannot listen on {settings.host!r}: {exc.strerror}", "host") from None
        try:
            with probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is free
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise BadSetting(f"{settings.host} is not an address of this machine", "host") from None
            where = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
            raise BadSetting(f"could not listen on {where}:{port}: {exc.strerror}", port_key) from None


def _listen(server: Any, settings: Settings, port_key: str) -> None:
    """Run a uvicorn server; a port it could not open is the setting's fault (uvicorn exits 3 for that)."""
    try:
        server.run()
    except SystemExit as exc:
        if exc.code in (0, None):
            return
        port = getattr(settings, port_key)
        raise BadSetting(
            f"could not listen on {settings.host}:{port} (the log above says why: in use by another process?)",
            port_key,
        ) from None


# Seconds uvicorn gives open connections once it stops (after a drain, for `serve`).
SHUTDOWN_CONNECTIONS_S = 10


def _drain_on_stop(workers: list[Any], settings: Settings, stops: list[int]) -> None:
    """A stop signal (Ctrl-C, SIGTERM): the first lets running jobs finish within the grace, and says so (the
    process went quiet for up to a minute, and a second Ctrl-C did nothing); a second hands them back to the
    queue now, where they wait for the next start or another worker. `stops` counts the signals so far."""
    stops[0] += 1
    busy = [worker.model for worker in workers if worker.busy]
    if stops[0] > 1:
        if busy:
            log.warning("stop asked again: handing the running job of %s back to the queue now", ", ".join(busy))
        for worker in workers:
            worker.drain(grace=0)
        return
    if busy:
        log.warning(
            "stopping: the running job of %s may finish first (up to %.0f s, WANSERVE_SHUTDOWN_GRACE; then it goes "
            "back to the queue); stop again (Ctrl-C) to hand it back now",
            ", ".join(busy),
            settings.shutdown_grace,
        )
    for worker in workers:
        worker.drain()


def _uvicorn(app: Any, host: str, port: int, on_signal: Any = None, keep_serving: bool = False) -> Any:
    """A uvicorn server that calls `on_signal` on SIGTERM/SIGINT. With `keep_serving`, it goes on answering
    (status polls, /health, cancels) until `on_signal`'s drain sets `should_exit`, rather than closing the port
    at the signal."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Once the drain is over and the server is stopping, a signal is uvicorn's again: a second Ctrl-C
            # cuts short its wait for open connections (a download that stalls, a player that holds one).
            if not keep_serving or self.should_exit:
                super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown, which would end the process with -15
            # before the workers drain; wanserve finishes its own shutdown and exits 0 instead.
            self._captured_signals.clear()
            if on_signal is not None:
                on_signal()

        async def shutdown(self, sockets: Any = None) -> None:
            # Event streams last as long as their jobs: told first, they end now rather than at the timeout.
            closing = getattr(getattr(app, "state", None), "closing", None)
            if closing is not None:
                closing.set()
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        lifespan="on",
        # h11, not httptools: httptools takes headers of any size, and one client sending 100 MB of them held the
        # event loop, every other request waiting, for 13 s (200 MB: a minute). h11 refuses past 16 KiB. Measured
        # with benchmarks/control_plane.py (SQLite, one API): 8 % fewer submits a second, 0 to 8 % fewer status reads,
        # still hundreds a second where a GPU finishes a video every minute or so.
        http="h11",
        # After the signal (and a drain), what is still being sent gets this long, not forever.
        timeout_graceful_shutdown=SHUTDOWN_CONNECTIONS_S,
    )
    return Server(config)


def run_serve(settings: Settings) -> None:
    """One process: the API, an SQLite (or any) store, and one resident worker thread per model."""
    from wanserve.api.app import create_app
    from wanserve.jobs import redacted
    from wanserve.metrics import Metrics
    from wanserve.worker import Worker

    specs = served_specs(settings)
    _one_process("serve")
    check_engine_settings(settings)
    _check_listen(settings, "port")
    store, storage = open_backends(settings)
    threading.Thread(target=_warn_of_unserved_jobs, args=(store, specs), name="unserved", daemon=True).start()
    metrics = Metrics(list(specs))
    metrics.watch_store(store, list(specs))
    start_together = threading.Barrier(len(specs))
    workers = [
        Worker(name, settings, store, storage, metrics, start_together=start_together, served=served_names(specs))
        for name in specs
    ]
    app = create_app(settings, store, storage, specs, metrics=metrics, readiness=lambda: _readiness(workers))
    for worker in workers:
        if specs[worker.model].provisional:
            threading.Thread(
                target=_describe_when_loaded, args=(worker, specs), name=f"describe-{worker.model}", daemon=True
            ).start()
    # The API answers throughout a drain (a job's status, /health; /ready says no), and stops after it. The
    # thread that stops it waits from the start: none is started from inside a signal handler.
    draining = threading.Event()
    stops = [0]  # signals so far, whichever handler took them

    def drain_then_stop() -> None:
        _drain_on_stop(workers, settings, stops)
        draining.set()

    def stop_once_drained() -> None:
        draining.wait()
        _wait_for_workers_with_jobs(workers, settings.shutdown_grace + 30)
        server.should_exit = True

    server = _uvicorn(app, settings.host, settings.port, on_signal=drain_then_stop, keep_serving=True)
    threading.Thread(target=stop_once_drained, name="drain", daemon=True).start()
    broken: list[str] = []
    wrong_settings: list[BadSetting] = []

    def run_worker_thread(worker: Any) -> None:
        # A model that cannot be loaded (or a worker that dies) stops the whole process: an API that kept
        # taking jobs for it would queue work nobody runs.
        try:
            worker.run()
        except BadSetting as exc:  # named as the user set it, exit 2, as when found before the start
            wrong_settings.append(exc)
            server.should_exit = True
        except WanserveError as exc:  # its message says what to fix; a traceback would only bury it
            broken.append(f"{worker.model}: {exc}")
            server.should_exit = True
        except Exception as exc:
            log.exception("worker for %s stopped with an error", worker.model)
            broken.append(f"{worker.model}: the worker stopped: {type(exc).__name__}: {exc}")
            server.should_exit = True

    threads = [
        threading.Thread(target=run_worker_thread, args=(w,), name=f"worker-{w.model}", daemon=True) for w in workers
    ]
    for thread in threads:
        thread.start()
    log.info(
        "wanserve starting: %s on http://%s:%d (store %s; %s)",
        ", ".join(specs),
        settings.host,
        settings.port,
        redacted(settings.store_url),
        _keys_state(settings),
    )

    # While uvicorn runs, its own handlers take SIGTERM/SIGINT (and drain, see _uvicorn); when it stops, it puts
    # back the handlers it found. Python's default ones there would let a second Ctrl-C or SIGTERM kill the
    # process mid-drain (SIGABRT from a torch thread), even in the instant between uvicorn's return and any
    # line after it; so these are installed first, and found and restored by uvicorn.
    def drain_on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining", signum)
        server.should_exit = True
        _drain_on_stop(workers, settings, stops)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, drain_on_signal)
    port_error: BadSetting | None = None
    try:
        _listen(server, settings, "port")  # returns after SIGINT/SIGTERM, or once a worker could not start
    except BadSetting as exc:
        port_error = exc  # the workers are loading already: drain them before saying so
    for worker in workers:
        worker.drain()
    _wait_for_workers_with_jobs(workers, settings.shutdown_grace + 30)
    store.close()
    if port_error is not None:
        raise port_error
    if wrong_settings:
        raise wrong_settings[0]
    if broken:
        raise WanserveError("; ".join(broken))


def _wait_for_workers_with_jobs(workers: list[Any], timeout: float) -> None:
    """Each drained worker's end, but not that of one still loading its model (or downloading it), which holds
    no job: a Ctrl-C then waited up to twice the grace for the load, saying nothing."""
    for worker in workers:
        if worker.claiming.is_set():
            worker.wait_stopped(timeout)
        elif not worker.wait_stopped(0):
            log.info("stopping while %s loads (it holds no job; the next start loads it again)", worker.model)


def served_names(specs: dict[str, ModelSpec]) -> frozenset[str]:
    return frozenset(specs) | {alias for spec in specs.values() for alias in spec.aliases}


def _warn_of_unserved_jobs(store: Any, specs: dict[str, ModelSpec], most: int = 100_000) -> None:
    """Say so when jobs wait for a model this process does not serve (queued, then `serve` restarted with other
    models): unless a standalone worker shares the store, none will ever claim them, and nothing else would
    tell."""
    from wanserve.expiry import unserved_words
    from wanserve.jobs import every_job

    served = served_names(specs)
    waiting: dict[str, int] = {}
    try:
        for job in every_job(store, most):
            if job.status == JobStatus.QUEUED and job.model not in served:
                waiting[job.model] = waiting.get(job.model, 0) + 1
    except Exception as exc:  # only a hint: a store that does not answer says so elsewhere
        log.debug("could not look for jobs of models not served: %s", exc)
        return
    for model, count in sorted(waiting.items()):
        log.warning(unserved_words(count, model))


def _readiness(workers: list[Any]) -> dict[str, Any]:
    models = {w.model: ("ready" if w.loaded.is_set() else (w.load_error or "loading")) for w in workers}
    stuck = {w.model: w.stuck for w in workers if w.stuck}
    draining = [w.model for w in workers if w.draining]
    ready = all(w.loaded.is_set() for w in workers) and not draining and not stuck
    return {"ready": ready, "models": models, "stuck": stuck, "draining": draining}


def api_replica_readiness() -> dict[str, Any]:
    """An API replica is ready while it answers and reaches the job store. Not the result storage: without it
    submits, status reads and cancels still work (a download answers 503 storage_unavailable), and as a
    readiness check it took every replica out of the Service together over one bucket's blip."""
    return {"ready": True, "models": {}, "needs_storage": False}


def run_api(settings: Settings) -> None:
    """A stateless API replica: any number can share one store (Redis) and one storage (S3)."""
    from wanserve.api.app import create_app
    from wanserve.expiry import Housekeeper
    from wanserve.metrics import Metrics

    specs = api_specs(settings)
    _one_process("api")
    _check_listen(settings, "port")
    store, storage = open_backends(settings)
    metrics = Metrics(list(specs))
    metrics.watch_store(store, list(specs))
    app = create_app(settings, store, storage, specs, metrics=metrics, readiness=api_replica_readiness)
    # Results expire, and dead workers' jobs go back to the queue, on time even while no worker runs (scaled to
    # zero), at the pace workers sweep at.
    sweeper = Housekeeper(
        store, storage, settings.housekeeping_interval, settings.max_attempts, settings.result_ttl, metrics
    )
    sweeper.start()
    try:
        log.info(
            "wanserve api: %s on http://%s:%d (%s)",
            ", ".join(specs),
            settings.host,
            settings.port,
            _keys_state(settings),
        )
        _listen(_uvicorn(app, settings.host, settings.port), settings, "port")
    finally:
        sweeper.stop()
        store.close()


def run_worker(settings: Settings, engine: Any = None) -> None:
    """One worker for one model, with /health, /ready, /metrics and POST /drain on `ops_port`.

    SIGTERM or /drain: stop claiming, finish the running job within `shutdown_grace`, else hand it back;
    then exit 0.
    """
    # A SIGTERM while the worker starts (imports and the engine check take seconds; a pod scaled down as it
    # comes up gets one) is a drain asked for early: kept, and acted on once the worker exists, instead of
    # an exit 143 with nothing logged. Ranks > 0 of a torchrun group have their own handling (_follow).
    asked: list[int] = []
    if engine is not None or process_rank() == 0:

        def early(signum: int, _frame: Any) -> None:
            log.info("signal %d while starting: the worker stops once it has started", signum)
            asked.append(signum)

        signal.signal(signal.SIGTERM, early)
        signal.signal(signal.SIGINT, early)

    # After the handler: these import torch, seconds in which a SIGTERM used to end the process (exit 143).
    from wanserve.jobs import redacted
    from wanserve.metrics import Metrics
    from wanserve.worker import Worker

    specs = served_specs(settings)
    if len(specs) != 1:
        raise BadSetting("a worker serves exactly one model; start one worker per model", "model")
    (model,) = specs
    if engine is None:
        check_engine_settings(settings)
    if engine is None and process_rank() != 0:
        _follow(model, settings)  # ranks > 0 of a torchrun group: no store, no ops port, only the engine
        return
    _check_listen(settings, "ops_port")
    deletion_cost = None
    if settings.pod_deletion_cost:
        from wanserve.kube import PodDeletionCost

        deletion_cost = PodDeletionCost.in_cluster(lambda: worker.busy)  # before the store: a wrong setting fails fast
    store, storage = open_backends(settings)
    metrics = Metrics([model])
    worker = Worker(model, settings, store, storage, metrics, engine=engine)
    if deletion_cost is not None:
        deletion_cost.start()

    # The ops port answers (/health, /ready = 503 while loading) before the possibly long model load. A worker
    # whose port is taken must not run on unseen: nothing could probe it, scrape it or drain it.
    ops = _uvicorn(ops_app(worker, metrics, store), settings.host, settings.ops_port)
    ops_failed: list[BadSetting] = []

    def serve_ops() -> None:
        try:
            _listen(ops, settings, "ops_port")
        except BadSetting as exc:
            ops_failed.append(exc)

    ops_thread = threading.Thread(target=serve_ops, name="ops", daemon=True)
    ops_thread.start()
    while not ops.started and ops_thread.is_alive():
        ops_thread.join(0.05)
    if ops_failed:
        store.close()
        raise ops_failed[0]
    # What `serve` and `api` say at their start: the first line an operator reads of a worker that claims nothing.
    log.info(
        "wanserve worker %s: %s (store %s; ops on http://%s:%d; %s)",
        worker.worker_id,
        model,
        redacted(settings.store_url),
        settings.host,
        settings.ops_port,
        _keys_state(settings),
    )

    # A 14B load takes minutes, and a worker holds no job while it loads: a stop then (KEDA scaling down a pod
    # that came up for a burst already served) ends the load at once rather than after it, or after the pod's
    # grace period has run out (SIGKILL). Not in a torchrun group: a rank 0 gone mid-load would leave the other
    # ranks waiting in a collective until its timeout.
    alone = world_size_from_env() <= 1

    stops = [0]

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining", signum)
        _drain_on_stop([worker], settings, stops)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if asked:
        on_signal(asked[0], None)
    abandoned = False
    if worker.engine is None and not worker.draining:  # no model load for a worker already told to stop
        if alone:
            worker.engine = _load_unless_drained(model, settings, worker)
            abandoned = worker.engine is None
            if abandoned:
                log.info("model load stopped: the worker was told to stop while it loaded")
        else:
            worker.engine = _leader_engine(model, settings)
    worker.run()
    if deletion_cost is not None:
        deletion_cost.stop()
    ops.should_exit = True
    ops_thread.join(timeout=5)  # a /drain's answer is sent first
    store.close()
    if abandoned:
        # The load goes on in its thread, inside torch: an interpreter shutting down around it can crash, so
        # the process ends here, its logs written. It held no job, and what a load writes (a download, a tiny
        # model's build) is written under another name and renamed, so nothing is left half-written.
        logging.shutdown()
        os._exit(0)


def _load_unless_drained(model: str, settings: Settings, worker: Any) -> Any:
    """The engine, loaded on a thread of its own; None if the worker is told to stop first (SIGTERM, /drain).

    A stop used to raise an exception into the load from the signal handler, wherever the main thread was:
    inside torch's C++ (an import it runs, a file read), pybind11 cannot pass it on and aborts the process
    ("terminate called after throwing an instance of 'pybind11::error_already_set'")."""
    loaded: list[Any] = []
    failed: list[BaseException] = []

    def load() -> None:
        try:
            loaded.append(_leader_engine(model, settings))
        except BaseException as exc:  # re-raised on the main thread, as if it had loaded there
            failed.append(exc)

    thread = threading.Thread(target=load, name="model-load", daemon=True)
    thread.start()
    while thread.is_alive():
        if worker.draining:
            return None
        thread.join(0.1)
    if failed:
        raise failed[0]
    return loaded[0]


def _leader_engine(model: str, settings: Settings) -> Any:
    """The engine rank 0 drives: the engine itself, or a `GroupLeader` that broadcasts each request."""
    from wanserve.engine.engine import Engine
    from wanserve.engine.parallel import GroupLeader

    engine = Engine.load(model, settings)  # under torchrun: joins the group and applies the layout
    return GroupLeader(engine) if engine.parallel is not None else engine


def _follow(model: str, settings: Settings) -> None:
    from wanserve.engine.engine import Engine
    from wanserve.engine.parallel import follow

    engine = Engine.load(model, settings)
    # torchrun forwards SIGTERM (Kubernetes' stop) to the ranks of its node. Rank 0 drains: it finishes or hands
    # back the job, then tells the others to stop; a follower that died at the signal would cut rank 0 off
    # mid-collective (FATAL, the job lost). So, once the group exists (rank 0 has passed its own start-up), a
    # follower waits for that word, and passes the drain on to rank 0's ops port in case the signal reached
    # only this node. (Python runs the handler when the follower's collective returns: within the leader's
    # idle beat, 10 s at most. Were rank 0 gone, the collective timeout ends this rank, as it would anyway.)
    signalled = threading.Event()

    def drain_through_rank_0(signum: int, _frame: Any) -> None:
        log.info("rank %s: signal %d: rank 0 drains the group; this rank stops when it says so", process_rank(), signum)
        if not signalled.is_set():
            signalled.set()
            threading.Thread(target=_ask_rank_0_to_drain, args=(settings,), daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, drain_through_rank_0)
        signal.signal(signal.SIGINT, drain_through_rank_0)
    follow(engine)


def _ask_rank_0_to_drain(settings: Settings) -> None:
    import urllib.request

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    url = f"http://{host}:{settings.ops_port}/drain"
    headers = {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="POST", headers=headers), timeout=5).close()
        log.info("rank %s: asked rank 0 to drain (%s)", process_rank(), url)
    except OSError as exc:  # rank 0 got the signal too (one node), or its ops port listens on another address
        log.info("rank %s: could not ask rank 0 to drain at %s: %s", process_rank(), url, exc)


def ops_app(worker: Any, metrics: Any, store: Any) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from wanserve.api.app import error_response, install_error_handlers
    from wanserve.api.auth import Unauthorized, key_matches, presented_key
    from wanserve.api.ops import answers, liveness, readiness_answer

    started = time.monotonic()

    # No schema either: four routes for probes, a scraper and a preStop hook (docs/operations.md).
    app = FastAPI(title="wanserve worker", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)  # errors (a refused drain, a 404) shaped as the API's, problem+json with a code

    @app.get("/health")
    async def health() -> JSONResponse:
        # Liveness: a worker whose engine call never came back (a hung GPU) is restarted by its orchestrator.
        # On the event loop, not in the thread pool: threads held by calls waiting on a store outage must not
        # make the process look dead.
        return liveness(worker.stuck, started)

    @app.get("/ready")
    def ready() -> JSONResponse:
        # The API's body (`status`, `reasons`), and what a worker adds. Not the storage: a worker that cannot
        # store a video says so on the job, and waits for it; a probe taking it out would not help.
        state = _readiness([worker])
        extra = {"stuck": state["stuck"], "draining": state["draining"], "busy": worker.busy}
        return readiness_answer(state, answers("store", store.ping), None, **extra)

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False, name="health_head")
    app.add_api_route("/ready", ready, methods=["HEAD"], include_in_schema=False, name="ready_head")

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/drain", response_model=None)
    def drain(request: Request) -> dict[str, Any] | JSONResponse:
        # Stopping a GPU worker costs a model load to undo. No browser has a reason to ask for it (a page on the
        # cluster network could, with a "simple" cross-site POST); and with API keys set, only the pod itself
        # (a preStop hook on loopback) or a caller with a key may.
        site = request.headers.get("sec-fetch-site", "").strip().lower()
        if request.headers.get("origin") is not None or site in ("cross-site", "same-site"):
            return error_response(
                request, 403, "cross_site_request", "a drain is not taken from a web page (Origin, Sec-Fetch-Site)"
            )
        loopback = request.client is not None and _is_loopback(request.client.host)
        keys = worker.settings.api_keys
        if keys and not loopback and not key_matches(presented_key(request), keys):
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        worker.drain()  # while the model loads, this ends the load too (`_load_unless_drained`)
        return {"draining": True, "busy": worker.busy}

    return app


def _is_loopback(host: str) -> bool:
    """127.0.0.1 or ::1 (also as a dual-stack socket reports it, ::ffff:127.0.0.1): not the rest of 127/8,
    from which a service-mesh sidecar may forward every outside caller (Istio uses 127.0.0.6)."""
    return host in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _keys_state(settings: Settings) -> str:
    keys = len(settings.api_keys)
    return f"API keys required ({keys} accepted)" if keys else "no API key required: anyone who reaches it may use it"
