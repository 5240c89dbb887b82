"""`wanserve doctor`: what this machine has, each line OK or a fix to try."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanserve.config import Settings
from wanserve.disk import has_room
from wanserve.errors import BadSetting


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run_checks(settings: Settings, where: Callable[[str], str] | None = None) -> Iterator[Check]:
    """`where` names a setting as the user set it (`--device` or `WANSERVE_DEVICE`), for the fixes to say."""
    named = where or (lambda key: f"WANSERVE_{key.upper()}")
    version = sys.version_info
    yield Check(
        "python",
        version >= (3, 11),
        platform.python_version() if version >= (3, 11) else f"{platform.python_version()}: install Python 3.11+",
    )
    yield from _torch(settings.device, named)
    yield from _video()
    yield from _cache(settings, named)
    yield from _store(settings, named)


def _torch(device: str, named: Callable[[str], str]) -> Iterator[Check]:
    try:
        import torch
    except ImportError:
        yield Check("torch", False, "not installed: `make install` (or pip install torch==2.13.0)")
        return
    yield Check("torch", True, torch.__version__)
    try:
        import diffusers

        yield Check("diffusers", True, diffusers.__version__)
    except ImportError:
        yield Check("diffusers", False, "not installed: `make install`")
    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            yield Check("cuda", False, f"{named('device')}={device}, but torch {torch.__version__} sees no CUDA device")
        else:
            yield Check("cuda", True, "no CUDA device: the engine runs on the CPU (fine for tiny models only)")
        return
    count = torch.cuda.device_count()
    if device.startswith("cuda:") and int(device.split(":")[1]) >= count:
        yield Check("cuda", False, f"{named('device')}={device}, but this machine has {count} CUDA device(s)")
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError as exc:  # a GPU in exclusive-process mode that a running worker holds, a bad driver
            yield Check(f"cuda:{index}", False, f"{props.name}: cannot be used from this process: {exc}")
            continue
        yield Check(
            f"cuda:{index}",
            True,
            f"{props.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), compute {props.major}.{props.minor}",
        )


def _video() -> Iterator[Check]:
    try:
        import av
    except ImportError:
        yield Check("pyav", False, "not installed: pip install av")
        return
    has_x264 = "libx264" in av.codecs_available
    yield Check(
        "pyav",
        has_x264,
        f"{av.__version__}, H.264 encoder libx264"
        if has_x264
        else f"{av.__version__} has no libx264: install the PyPI wheel of av (it bundles libx264)",
    )


def _cache(settings: Settings, named: Callable[[str], str]) -> Iterator[Check]:
    cache = settings.cache_dir.expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / ".doctor"
        probe.write_text("ok")
        probe.unlink()
        tiny = sorted(p.name for p in (cache / "tiny").glob("*") if (p / "model_index.json").exists())
        yield Check("model cache", True, f"{cache} (tiny models built: {', '.join(tiny) or 'none yet'})")
    except OSError as exc:
        yield Check("model cache", False, f"{cache} is not writable ({exc}): set {named('cache_dir')}")
    if settings.models_dir is not None:
        yield from _models_dir(settings.models_dir, named)
    yield from _served_models(settings, named)


def _models_dir(folder: Path, named: Callable[[str], str]) -> Iterator[Check]:
    from wanserve.catalog import spec_from_directory
    from wanserve.errors import ModelNotFound

    if not folder.is_dir():
        yield Check("models dir", False, f"{folder} does not exist: fix {named('models_dir')}")
        return
    found = sorted(p for p in folder.glob("*") if (p / "model_index.json").exists())
    if not found:
        yield Check("models dir", False, f"{folder} holds no diffusers model (expected <dir>/<name>/model_index.json)")
        return
    good = []
    for model in found:
        try:
            spec_from_directory(model)  # what a start reads: a damaged or incomplete copy is named now
            good.append(model.name)
        except ModelNotFound as exc:
            yield Check("models dir", False, exc.rule)
    if good:
        yield Check("models dir", True, f"{folder}: {', '.join(good)}")


def _served_models(settings: Settings, named: Callable[[str], str]) -> Iterator[Check]:
    """Where each model a start would serve comes from, as `engine.loading.locate` finds it, without loading or
    downloading anything: a start that would fail says so here."""
    from wanserve.catalog import complete_snapshot, copy_of, models_dir_copy, resolve_spec
    from wanserve.engine.loading import hub_offline, hub_refuses
    from wanserve.errors import ModelNotFound

    for name in settings.model:
        try:
            spec = resolve_spec(name)
        except ModelNotFound as exc:
            yield Check(f"model {name}", False, f"{exc.rule}: fix {named('model')}")
            continue
        if spec.tiny:
            yield Check(f"model {name}", True, "tiny: built offline at the first start")
            continue
        if spec.local_path:
            yield Check(f"model {name}", True, spec.local_path)
            continue
        local = models_dir_copy(spec, settings.models_dir)
        if local is not None:
            try:
                copy_of(spec, local)
                yield Check(f"model {name}", True, f"{local} (models dir)")
            except ModelNotFound as exc:
                yield Check(f"model {name}", False, exc.rule)
            continue
        cached = complete_snapshot(str(spec.repo_id))
        if cached is not None:
            yield Check(f"model {name}", True, f"{spec.repo_id} in the Hugging Face cache ({cached})")
        elif hub_offline():
            yield Check(
                f"model {name}",
                False,
                f"{spec.repo_id} is neither in the Hugging Face cache nor the models dir, and HF_HUB_OFFLINE is set: "
                f"copy it in (`hf download {spec.repo_id}` on a machine with network)",
            )
        else:
            problem = hub_refuses(str(spec.repo_id))
            if problem is None:
                yield Check(
                    f"model {name}",
                    True,
                    f"{spec.repo_id} is not on this machine yet: the first start downloads it from the Hugging Face "
                    "Hub (which answers from here)",
                )
            else:
                yield Check(
                    f"model {name}",
                    False,
                    f"{spec.repo_id} is neither in the Hugging Face cache nor the models dir, and {problem}: a start "
                    f"would fail; copy it in (`hf download {spec.repo_id}` on a machine with network)",
                )


def _store(settings: Settings, named: Callable[[str], str]) -> Iterator[Check]:
    from wanserve.jobs import redacted, sqlite_path
    from wanserve.storage import check_storage_url, local_folder_problem, local_storage_path

    url = settings.store_url
    try:
        database = sqlite_path(url)  # None: Redis
    except ValueError as exc:
        yield Check("job store", False, f"{exc}: fix {named('store')}")
        return
    try:
        if check_storage_url(settings.storage_url) == "s3":
            yield _s3_check(settings.storage_url)
        else:
            folder = local_storage_path(settings.storage_url)
            assert folder is not None
            problem = local_folder_problem(folder.absolute())
            where_from = named("storage") if settings.storage is not None else named("data_dir")
            existing = next((p for p in (folder.absolute(), *folder.absolute().parents) if p.exists()), None)
            if problem is not None:
                yield Check("storage", False, f"{folder} cannot hold the videos: {problem}: fix {where_from}")
            elif existing is not None and not has_room(existing):  # as /ready judges it: a video would not fit
                yield Check("storage", False, f"{folder} cannot hold the videos: the disk under {existing} is full")
            else:
                yield Check("storage", True, f"{folder}" + ("" if folder.exists() else " (created at the first start)"))
    except ValueError as exc:
        yield Check("storage", False, f"{exc}: fix {named('storage')}")
    shown = redacted(url)
    if database is not None:
        where_from = named("store") if settings.store is not None else named("data_dir")
        yield _sqlite_check(database, where_from)
        return
    import redis

    from wanserve.errors import BadSetting
    from wanserve.jobs.redis_store import RedisJobStore

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:  # it answers, but not to this URL
        yield Check("redis", False, f"{shown} refuses it ({exc}): fix {named('store')}")
        return
    except Exception as exc:
        yield Check("redis", False, f"{shown} does not answer ({exc}): start redis-server or fix {named('store')}")
        return
    store = RedisJobStore(url)
    try:
        store.check_settings(warn=False)  # what a start checks (the scripts, the clock, the events channel)
    except BadSetting as exc:
        yield Check("redis", False, f"{exc.rule}: fix {named('store')}")
        return
    finally:
        store.close()
    try:
        version = f" (redis {client.info('server').get('redis_version')})"
    except redis.RedisError:  # INFO refused (a managed service, an ACL without it): not needed
        version = ""
    yield Check("redis", True, f"{shown} answers{version}")
    yield from _redis_keeps_jobs(client)


def _redis_keeps_jobs(client: Any) -> Iterator[Check]:
    """What docs/operations.md asks of the Redis that holds the queue: an append-only file (a restart without
    one loses every job since the last snapshot) and no eviction (a full Redis that evicts drops jobs). Read
    with INFO, which managed services allow where they refuse CONFIG; a field not reported is not judged."""
    from wanserve.jobs.redis_store import keeping_problems

    try:
        problems = keeping_problems(client)
    except Exception:  # INFO refused or cut short: the connection check above already spoke
        return
    if problems:
        yield Check("redis jobs", False, "; ".join(problems) + ": docs/operations.md, section 1")
    else:
        yield Check("redis jobs", True, "kept across a restart (append-only file) and never evicted")


def _sqlite_check(path: Path, where_from: str) -> Check:
    """Opened read-only: a doctor run must not create the file, nor take a lock a running service waits on."""
    import sqlite3

    if not path.exists():
        # What the first start will have to make: is the nearest folder that exists one it may write in?
        existing = next(p for p in path.parents if p.exists())
        if not existing.is_dir():
            return Check("job store", False, f"{path} cannot be created: {existing} is a file: fix {where_from}")
        if not os.access(existing, os.W_OK | os.X_OK):
            return Check("job store", False, f"{path} cannot be created: {existing} is not writable: fix {where_from}")
        if not has_room(existing):
            return Check("job store", False, f"{path} cannot be created: the disk under {existing} is full")
        return Check("job store", True, f"{path} (created at the first start)")
    if path.is_dir():
        return Check("job store", False, f"{path} is a folder, not a database file: fix {where_from}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)) as conn:
            problem = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as exc:
        return Check("job store", False, f"{path}: {exc}: move it aside (jobs in it are lost) or restore a copy")
    if problem != "ok":
        return Check("job store", False, f"{path} is damaged ({problem}): move it aside or restore a copy")
    if not has_room(path.parent):
        return Check("job store", False, f"{path}: its disk is full: free some space")
    return Check("job store", True, f"{path}")


def _s3_check(url: str) -> Check:
    from botocore.exceptions import NoCredentialsError

    from wanserve.storage import open_storage
    from wanserve.storage.s3 import endpoint_from_env

    endpoint = endpoint_from_env() or "AWS"
    try:
        problem = open_storage(url).bucket_problem()  # type: ignore[attr-defined]
    except BadSetting as exc:  # an endpoint that is no URL: it names the variable
        return Check("storage", False, f"{url}: {exc}")
    except Exception as exc:  # no answer, no credentials at all
        if isinstance(exc, NoCredentialsError) or isinstance(exc.__cause__, NoCredentialsError):
            fix = "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or role)"
            return Check("storage", False, f"{url}: {fix}")
        return Check(
            "storage",
            False,
            f"{url}: {endpoint} does not answer ({type(exc).__name__}: {exc}): check WANSERVE_S3_ENDPOINT_URL",
        )
    if problem is not None:
        return Check("storage", False, f"{url} at {endpoint}: {problem}")
    return Check("storage", True, f"{url} answers ({endpoint})")
