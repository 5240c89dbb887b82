"""`JobStore` on Redis: many API replicas and workers on many machines share one queue.

Keys, under a prefix (default `wanserve`):

    {p}:job:{id}         hash: the job, one field per Job field (request/result as JSON), plus its `seq`
    {p}:seq              counter giving each job its arrival number
    {p}:queue:{model}    zset of waiting jobs: score -priority, member "<seq, 16 digits>:<id>", so equal
                         priorities fall back to the member's lexical order, i.e. arrival; exact for any seq
    {p}:leases           zset of running job ids by lease expiry (what `reap` scans)
    {p}:running:{model}  set of running job ids (running_count)
    {p}:all              zset of every job id by seq (list)
    {p}:expiry           zset of finished job ids by expires_at (expired)
    {p}:idem:{key}       the id of the job an Idempotency-Key created, kept IDEMPOTENCY_TTL_S
    {p}:gone:{id}        the seq of a deleted job, kept CURSOR_TTL_S so `list(after=id)` still knows its place
    {p}:op:{token}       the reply of one state change, kept 10 minutes (see `_once`)
    {p}:events           pub/sub channel: {"id", "status", "progress", "stage"} after every change

Every state change is one Lua script, so it is atomic across processes. Lua only moves scalar fields and
never decodes the request/result JSON: Redis's cjson would turn an empty list into `{}`.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AuthenticationError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from wanserve.errors import BadSetting, InvalidRequest, JobNotFound, QueueFull, StoreUnavailable, unavailable_on
from wanserve.jobs import CURSOR_TTL_S, IDEMPOTENCY_TTL_S, QUEUE_FULL_RETRY_AFTER, WORKER_LOST_MESSAGE, redacted
from wanserve.jobs.model import Counts, Job, JobStatus

log = logging.getLogger(__name__)

_JSON_FIELDS = ("request", "result")
_FLOAT_FIELDS = (
    "created_at",
    "updated_at",
    "started_at",
    "queued_at",
    "completed_at",
    "expires_at",
    "progress",
    "lease_expires_at",
)
_INT_FIELDS = ("priority", "attempts")
_OP_TTL_S = 600
# How long one command may go unanswered before the store counts as unavailable (see RedisJobStore).
SOCKET_TIMEOUT_S = 5.0

# ARGV[1] is always the key prefix; KEYS[1], in the scripts that use `once`, is a fresh {p}:op:{token} key.
_LUA_COMMON = r"""
local prefix = ARGV[1]
local function k(...) return prefix .. ':' .. table.concat({...}, ':') end
local function member(seq, id) return string.format('%016d', tonumber(seq)) .. ':' .. id end

-- redis-py retries a command whose connection broke, and the script may already have run. Its reply is
-- kept under the caller's one-off token, so the retry gets the first reply instead of acting twice.
local function once(fn)
  local cached = redis.call('GET', KEYS[1])
  if cached then return cached end
  local reply = cjson.encode(fn())
  redis.call('SET', KEYS[1], reply, 'EX', tonumber(ARGV[#ARGV]))
  return reply
end

-- Leases are judged by the Redis server's clock: workers on several hosts never agree to the second, and a
-- host whose clock ran a lease ahead would reap every live job. `given` (tests) stands in for it.
local function clock(given)
  if given ~= '' then return given end
  local t = redis.call('TIME')
  return string.format('%d.%06d', t[1], t[2])
end
-- %.17g: a double as it is. %.6f rounded the lease, so a lease that ends exactly at `now` could read as ended
-- before it (SQLite keeps it whole): the two stores disagreed at the boundary.
local function later(t, seconds) return string.format('%.17g', tonumber(t) + tonumber(seconds)) end

local function publish(id)
  local h = redis.call('HMGET', k('job', id), 'status', 'progress', 'stage')
  local event = {id = id, status = h[1], progress = tonumber(h[2]) or 0, stage = h[3] or cjson.null}
  redis.call('PUBLISH', k('events'), cjson.encode(event))
end

local function held(id, worker)
  local h = redis.call('HMGET', k('job', id), 'status', 'worker_id')
  return h[1] == 'in_progress' and h[2] == worker
end

-- A full Redis (noeviction) refuses a script's writes only until its first one, and ZREM or SREM, which free
-- memory, are taken even when full: a claim or a requeue went through, and then every lease renewal and result
-- of the run it started was refused (results dropped, attempts spent). A write refused when full, changing
-- nothing, goes first in those: the whole script is refused, and its caller waits, as for any outage.
local function refused_when_full() redis.call('INCRBY', k('seq'), 0) end

-- What a claim whose reply was kept (`reply`: the job's fields, flat, or null) took, as it is now: the job while
-- `holder` still holds it; null for a claim that took nothing, or a job reaped, cancelled or taken meanwhile.
local function kept_claim(reply, holder)
  local flat = cjson.decode(reply)
  if type(flat) == 'table' then
    for i = 1, #flat - 1, 2 do
      if flat[i] == 'id' and held(flat[i + 1], holder) then
        return cjson.encode(redis.call('HGETALL', k('job', flat[i + 1])))
      end
    end
  end
  return cjson.encode(cjson.null)
end

local function cancel_requested(id) return redis.call('HGET', k('job', id), 'cancel_requested') == '1' end

local function leave_running(id, model)
  redis.call('ZREM', k('leases'), id)
  redis.call('SREM', k('running', model), id)
end

local function finish(id, status, now, expires)
  local jk = k('job', id)
  local h = redis.call('HMGET', jk, 'status', 'model', 'seq')
  if h[1] == 'queued' then redis.call('ZREM', k('queue', h[2]), member(h[3], id)) end
  leave_running(id, h[2])
  redis.call('HSET', jk, 'status', status, 'updated_at', now, 'completed_at', now, 'expires_at', expires)
  redis.call('HDEL', jk, 'lease_expires_at')
  redis.call('ZADD', k('expiry'), expires, id)
  publish(id)
end

-- Back to the queue under its original seq, so it regains its original place.
local function requeue(id, now)
  local jk = k('job', id)
  local h = redis.call('HMGET', jk, 'model', 'seq', 'priority')
  leave_running(id, h[1])
  redis.call('HSET', jk, 'status', 'queued', 'updated_at', now, 'queued_at', now, 'progress', '0.0')
  redis.call('HDEL', jk, 'worker_id', 'lease_expires_at', 'started_at', 'stage')
  redis.call('ZADD', k('queue', h[1]), -tonumber(h[3]), member(h[2], id))
  publish(id)
end
"""

# ARGV: prefix, id, model, priority, max_queued or '', idempotency key or '', its ttl, field, value, ..., op ttl
_ENQUEUE = """
return once(function()
  local id, model, key = ARGV[2], ARGV[3], ARGV[6]
  local jk = k('job', id)
  if key ~= '' then
    local prior = redis.call('GET', k('idem', key))
    if prior and redis.call('EXISTS', k('job', prior)) == 1 then
      return {'replay', redis.call('HGETALL', k('job', prior))}
    end
  end
  if redis.call('EXISTS', jk) == 1 then return 'exists' end
  if ARGV[5] ~= '' and redis.call('ZCARD', k('queue', model)) >= tonumber(ARGV[5]) then return 'full' end
  if key ~= '' then redis.call('SET', k('idem', key), id, 'EX', tonumber(ARGV[7])) end
  local seq = redis.call('INCR', k('seq'))
  local fields = {}
  for i = 8, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', jk, 'seq', seq, unpack(fields))
  redis.call('ZADD', k('queue', model), -tonumber(ARGV[4]), member(seq, id))
  redis.call('ZADD', k('all'), seq, id)
  publish(id)
  return 'ok'
end)
"""

# ARGV: prefix, model, worker, now ('' for the server's clock), lease seconds, op ttl
_CLAIM = """
-- Nothing to claim changes nothing, so it needs no token: idle workers poll often. A retry of a claim that did
-- take the last job finds its first reply first: the job as it is now, while this holder still holds it (an
-- outage past its lease, and it was reaped, cancelled or taken by another worker meanwhile: nothing).
local replied = redis.call('GET', KEYS[1])
if replied then return kept_claim(replied, ARGV[3]) end
if redis.call('ZCARD', k('queue', ARGV[2])) == 0 then return cjson.encode(cjson.null) end
return once(function()
  refused_when_full()
  local queue = k('queue', ARGV[2])
  while true do
    local first = redis.call('ZRANGE', queue, 0, 0)[1]
    if not first then return cjson.null end
    redis.call('ZREM', queue, first)
    local id = string.sub(first, 18)
    local jk = k('job', id)
    if redis.call('HGET', jk, 'status') == 'queued' then  -- anything else is a stale entry: dropped
      local now = clock(ARGV[4])
      local lease_until = later(now, ARGV[5])
      redis.call('HSET', jk, 'status', 'in_progress', 'worker_id', ARGV[3], 'started_at', now,
                 'updated_at', now, 'lease_expires_at', lease_until)
      redis.call('HINCRBY', jk, 'attempts', 1)
      redis.call('ZADD', k('leases'), lease_until, id)
      redis.call('SADD', k('running', ARGV[2]), id)
      publish(id)
      return redis.call('HGETALL', jk)
    end
  end
end)
"""

# ARGV: prefix, worker. Reads what the claim under KEYS[1]'s token took (see `JobStore.claimed`), claiming nothing.
_CLAIMED = """
local replied = redis.call('GET', KEYS[1])
if not replied then return cjson.encode(cjson.null) end
return kept_claim(replied, ARGV[2])
"""

# ARGV: prefix, id, worker, now ('' for the server's clock), lease seconds. Re-running it is harmless, so it
# needs no token.
_RENEW = """
local id = ARGV[2]
if not held(id, ARGV[3]) then return 0 end
-- Extended even when cancel is requested: the worker holds the job until it marks it cancelled.
local lease_until = later(clock(ARGV[4]), ARGV[5])
redis.call('HSET', k('job', id), 'lease_expires_at', lease_until)
redis.call('ZADD', k('leases'), lease_until, id)
if cancel_requested(id) then return 0 end
return 1
"""

# ARGV: prefix, id, worker, progress, now ('' for the server's clock), '1' if a stage is given else '0', stage
_SET_PROGRESS = """
local id = ARGV[2]
if not held(id, ARGV[3]) then return 0 end
redis.call('HSET', k('job', id), 'progress', ARGV[4], 'updated_at', clock(ARGV[5]))
if ARGV[6] == '1' then redis.call('HSET', k('job', id), 'stage', ARGV[7]) end
publish(id)
if cancel_requested(id) then return 0 end
return 1
"""

# ARGV: prefix, id, worker, now ('' for the server's clock), result ttl, result JSON, op ttl
_COMPLETE = """
return once(function()
  if not held(ARGV[2], ARGV[3]) or cancel_requested(ARGV[2]) then return false end
  redis.call('HSET', k('job', ARGV[2]), 'result', ARGV[6], 'progress', '1.0', 'stage', 'done')
  local now = clock(ARGV[4])
  finish(ARGV[2], 'completed', now, later(now, ARGV[5]))
  return true
end)
"""

# ARGV: prefix, id, worker, now ('' for the server's clock), result ttl, code, message, op ttl
_FAIL = """
return once(function()
  if not held(ARGV[2], ARGV[3]) then return false end
  redis.call('HSET', k('job', ARGV[2]), 'error_code', ARGV[6], 'error_message', ARGV[7])
  local now = clock(ARGV[4])
  finish(ARGV[2], 'failed', now, later(now, ARGV[5]))
  return true
end)
"""

# ARGV: prefix, id, worker, now ('' for the server's clock), result ttl, op ttl
_MARK_CANCELLED = """
return once(function()
  if not held(ARGV[2], ARGV[3]) then return false end
  local now = clock(ARGV[4])
  finish(ARGV[2], 'cancelled', now, later(now, ARGV[5]))
  return true
end)
"""

# ARGV: prefix, id, worker, now ('' for the server's clock), op ttl
_RELEASE = """
return once(function()
  local id = ARGV[2]
  -- A job the user cancelled must not run again: the worker marks it cancelled (or reap does).
  if not held(id, ARGV[3]) or cancel_requested(id) then return false end
  redis.call('HINCRBY', k('job', id), 'attempts', -1)
  requeue(id, clock(ARGV[4]))
  return true
end)
"""

# ARGV: prefix, id, now ('' for the server's clock), result ttl, op ttl. Replies {1 if this call ended the job
# else 0, the job}, or false for no such job. Under a token: a retry must say "ended" again, or the cancel of a
# queued job whose first reply was lost would go uncounted.
_REQUEST_CANCEL = """
local cached = redis.call('GET', KEYS[1])
if cached then return cached end
local status = redis.call('HGET', k('job', ARGV[2]), 'status')
-- Nothing to change (missing, finished, or asked already): nothing for a retry to replay, so no copy of the
-- job is kept under the token. Cancels sent again and again cost no memory.
if not status then return cjson.encode(false) end
if status ~= 'queued' and (status ~= 'in_progress' or cancel_requested(ARGV[2])) then
  return cjson.encode({0, redis.call('HGETALL', k('job', ARGV[2]))})
end
return once(function()
  local id = ARGV[2]
  local jk = k('job', id)
  local now, ended = clock(ARGV[3]), 0
  if status == 'queued' then
    finish(id, 'cancelled', now, later(now, ARGV[4]))
    ended = 1
  elseif status == 'in_progress' and not cancel_requested(id) then
    redis.call('HSET', jk, 'cancel_requested', '1', 'updated_at', now)
    publish(id)
  end
  return {ended, redis.call('HGETALL', jk)}
end)
"""

# ARGV: prefix, now ('' for the server's clock), result ttl, max_attempts, worker-lost message template. A retry
# just finds less to do.
_REAP = """
local now, max_attempts = clock(ARGV[2]), tonumber(ARGV[4])
local expires = later(now, ARGV[3])
local changed = {}
local due = redis.call('ZRANGEBYSCORE', k('leases'), '-inf', '(' .. now, 'LIMIT', 0, 1000)
if #due > 0 then refused_when_full() end
for _, id in ipairs(due) do
  local jk = k('job', id)
  local h = redis.call('HMGET', jk, 'status', 'attempts')
  if h[1] ~= 'in_progress' then
    redis.call('ZREM', k('leases'), id)
  else
    if cancel_requested(id) then  -- its worker died while stopping: the user's cancel stands
      finish(id, 'cancelled', now, expires)
    elseif tonumber(h[2]) >= max_attempts then
      redis.call('HSET', jk, 'error_code', 'worker_lost', 'error_message', string.format(ARGV[5], tonumber(h[2])))
      finish(id, 'failed', now, expires)
    else
      requeue(id, now)
    end
    changed[#changed + 1] = redis.call('HGETALL', jk)
  end
end
return changed
"""

# ARGV: prefix, id, op ttl
_DELETE = """
return once(function()
  local id = ARGV[2]
  local jk = k('job', id)
  local job = redis.call('HGETALL', jk)
  if #job == 0 then return 'missing' end
  local h = redis.call('HMGET', jk, 'status', 'model', 'seq')
  if h[1] == 'in_progress' and not cancel_requested(id) then return 'running' end
  if h[1] == 'queued' then redis.call('ZREM', k('queue', h[2]), member(h[3], id)) end
  leave_running(id, h[2])
  redis.call('ZREM', k('all'), id)
  redis.call('ZREM', k('expiry'), id)
  redis.call('DEL', jk)
  redis.call('SET', k('gone', id), h[3], 'EX', tonumber(ARGV[3]))
  return job
end)
"""

# ARGV: prefix, id. Replies -1: no such job, 0: not queued, else the 1-based place.
_POSITION = """
local h = redis.call('HMGET', k('job', ARGV[2]), 'status', 'model', 'seq')
if not h[1] then return -1 end
if h[1] ~= 'queued' then return 0 end
local rank = redis.call('ZRANK', k('queue', h[2]), member(h[3], ARGV[2]))
if not rank then return 0 end
return rank + 1
"""

# ARGV: prefix. What the state changes need leave to do, asked at start of an ACL user: a write that changes
# nothing, the server's clock, and (Redis 7, which can ask without doing) a publish of the job events.
_CHECK = """
refused_when_full()
redis.call('TIME')
if redis.acl_check_cmd and not redis.acl_check_cmd('PUBLISH', k('events'), '') then
  return redis.error_reply("NOPERM this user has no permissions to run the 'publish' command on " .. k('events'))
end
return 1
"""

# A claim's holder is `<worker id>/<claim number>`: the workers are the holders less their claim numbers.
_COUNTS = """
local ids = redis.call('SMEMBERS', k('running', ARGV[2]))
local seen, workers = {}, 0
for _, id in ipairs(ids) do
  local holder = redis.call('HGET', k('job', id), 'worker_id') or id
  local worker = string.match(holder, '^(.*)/[^/]*$') or holder
  if not seen[worker] then
    seen[worker] = true
    workers = workers + 1
  end
end
return {redis.call('ZCARD', k('queue', ARGV[2])), #ids, workers}
"""


def _to_fields(job: Job) -> list[str]:
    """HSET arguments for `job`: None fields are left out, which `_from_fields` reads back as None."""
    out: list[str] = []
    for name, value in job.to_dict().items():
        if value is None:
            continue
        if name in _JSON_FIELDS:
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, float):
            text = repr(value)  # exact round trip, unlike Lua's %.14g
        else:
            text = str(value)
        out += [name, text]
    return out


def _from_fields(fields: dict[str, str]) -> Job:
    data: dict[str, Any] = {}
    for name, text in fields.items():
        if name == "seq":
            continue
        if name in _JSON_FIELDS:
            data[name] = json.loads(text)
        elif name in _FLOAT_FIELDS:
            data[name] = float(text)
        elif name in _INT_FIELDS:
            data[name] = int(text)
        elif name == "cancel_requested":
            data[name] = text == "1"
        else:
            data[name] = text
    return Job.from_dict(data)


def _clock(now: float | None) -> str:
    """`now` for a lease script: '' lets the script read the Redis server's clock (see `clock` in the Lua)."""
    return "" if now is None else repr(float(now))


def _from_flat(flat: list[str]) -> Job:
    return _from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))


def keeping_problems(client: Any) -> list[str]:
    """What docs/operations.md asks of the Redis that holds the queue and it does not do: an append-only file
    (a restart without one loses every job since the last snapshot) and no eviction (a full Redis that evicts
    drops jobs). Read with INFO, which managed services allow where they refuse CONFIG; a field not reported
    is not judged."""
    persistence, memory = client.info("persistence"), client.info("memory")
    problems = []
    if persistence.get("aof_enabled") == 0:
        problems.append("its append-only file is off: a restart loses the jobs since a snapshot (appendonly yes)")
    policy = memory.get("maxmemory_policy")
    if memory.get("maxmemory") and policy not in (None, "noeviction"):
        problems.append(f"it evicts keys when full ({policy}), jobs among them (maxmemory-policy noeviction)")
    return problems


def _answers_without_tls(url: str) -> bool:
    """Whether the host and port of a `rediss://` URL answer a PING in plain text: a TLS handshake sent there
    waits until it times out, the same as a server that is down."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+", b"-"))  # PONG, or an error such as NOAUTH: Redis, in plain text


def _state(exc: BaseException) -> str:
    if isinstance(exc, ReadOnlyError):
        return "takes no writes: it is a replica (a failover under way, or the URL names a replica)"
    if isinstance(exc, OutOfMemoryError):
        return "is full (maxmemory reached, with noeviction): free memory or raise maxmemory"
    if isinstance(exc, RedisTimeoutError):  # it may yet act on what it was sent: not "cannot be reached"
        return f"did not answer within {SOCKET_TIMEOUT_S:g} s"
    return "cannot be reached"


# A replica refuses writes (READONLY) during a failover, until clients reach the new primary; a full Redis
# (OOM, under the noeviction that keeps accepted jobs) refuses them until memory is freed: outages to wait out,
# as a restart is, not errors of the request (they were 500s, and workers that died on their next write).
@unavailable_on(
    (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError),
    StoreUnavailable,
    "the job store (Redis)",
    state=_state,
    refused=lambda exc: (
        "full" if isinstance(exc, OutOfMemoryError) else "read_only" if isinstance(exc, ReadOnlyError) else None
    ),
    one_asks=True,
    ungated=("ping", "check_settings", "close"),
)
class RedisJobStore:
    def __init__(self, url: str, prefix: str = "wanserve") -> None:
        self.prefix = prefix
        self._url = url
        self._shown = redacted(url)
        self.events_channel = f"{prefix}:events"
        # Retrying every command is safe: reads are idempotent, and the scripts that are not carry a token.
        # A connection refused or dropped is retried, with about 7 s of backoff in all (9 s with the tries),
        # which rides out a Redis restart or a failover. A timeout is not: a Redis that takes connections and
        # does not answer (a stopped process, a host that hangs) would hold each call for every try's
        # `socket_timeout`, and a connection's health check, itself retried inside each try, for every one of
        # them again (81 timeouts of 30 s: 40 minutes a call, API requests and job writes all waiting). A
        # command answers in well under a millisecond; 5 s is a server that is not answering.
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8, supported_errors=(RedisConnectionError,))
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            retry=retry,
            retry_on_error=[RedisConnectionError],
            health_check_interval=10,  # PING a connection idle that long before trusting it
            socket_connect_timeout=5,
            socket_timeout=SOCKET_TIMEOUT_S,
            # TCP only: a Unix socket's connection takes no keepalive, and refused every command for it.
            **({} if url.lower().startswith("unix:") else {"socket_keepalive": True}),
        )
        # Health checks want a quick "no", not ten seconds of retries. Probes that overlap (a balancer and
        # Kubernetes, each probing every replica) wait for one of its few connections, up to 2 s, instead of
        # being refused one and reading that as "Redis is down".
        probe_pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=4, timeout=2, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2, socket_timeout=2
        )
        self._probe = redis.Redis(connection_pool=probe_pool)
        register = self._redis.register_script
        self._enqueue = register(_LUA_COMMON + _ENQUEUE)
        self._claim = register(_LUA_COMMON + _CLAIM)
        self._claimed = register(_LUA_COMMON + _CLAIMED)
        self._renew = register(_LUA_COMMON + _RENEW)
        self._set_progress = register(_LUA_COMMON + _SET_PROGRESS)
        self._complete = register(_LUA_COMMON + _COMPLETE)
        self._fail = register(_LUA_COMMON + _FAIL)
        self._mark_cancelled = register(_LUA_COMMON + _MARK_CANCELLED)
        self._release = register(_LUA_COMMON + _RELEASE)
        self._request_cancel = register(_LUA_COMMON + _REQUEST_CANCEL)
        self._reap = register(_LUA_COMMON + _REAP)
        self._delete = register(_LUA_COMMON + _DELETE)
        self._position = register(_LUA_COMMON + _POSITION)
        self._counts = register(_LUA_COMMON + _COUNTS)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _once(self, script: Any, *args: Any, op: str | None = None) -> Any:
        """Run a state-changing script under a token (see `once` in the Lua) and decode its reply: `op` when the
        caller retries one write across outages, else a fresh one (redis-py's own retries reuse it)."""
        op_key = self._key("op", op or uuid.uuid4().hex)
        return json.loads(script(keys=[op_key], args=[self.prefix, *args, _OP_TTL_S]))

    def _jobs(self, ids: list[str]) -> list[Job]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._key("job", job_id))
        return [_from_fields(fields) for fields in pipe.execute() if fields]  # skips ones deleted meanwhile

    # ---- JobStore ----------------------------------------------------------------------------------------

    def enqueue(self, job: Job, max_queued: int | None = None) -> Job:
        if job.status != JobStatus.QUEUED:
            raise ValueError(f"enqueue takes a queued job, not a {job.status.value} one")
        limit = "" if max_queued is None else str(max_queued)
        key = job.idempotency_key or ""
        reply = self._once(
            self._enqueue, job.id, job.model, job.priority, limit, key, IDEMPOTENCY_TTL_S, *_to_fields(job)
        )
        if isinstance(reply, list):  # ["replay", the job the key created]
            return _from_flat(reply[1])
        if reply == "exists":
            raise ValueError(f"a job with id {job.id!r} already exists")
        if reply == "full":
            raise QueueFull(job.model, max_queued or 0, QUEUE_FULL_RETRY_AFTER)
        return replace(job)

    def get(self, job_id: str) -> Job:
        fields = self._redis.hgetall(self._key("job", job_id))
        if not fields:
            raise self._missing(job_id)
        return _from_fields(fields)

    def _missing(self, job_id: str) -> JobNotFound:
        """Told apart from an id never known: a job deleted or expired lately "no longer exists"."""
        return JobNotFound(job_id, deleted=bool(self._redis.exists(self._key("gone", job_id))))

    def claim(
        self, model: str, worker_id: str, lease_seconds: float, now: float | None = None, op: str | None = None
    ) -> Job | None:
        flat = self._once(self._claim, model, worker_id, _clock(now), repr(float(lease_seconds)), op=op)
        return None if flat is None else _from_flat(flat)

    def claimed(self, worker_id: str, op: str) -> Job | None:
        flat = json.loads(self._claimed(keys=[self._key("op", op)], args=[self.prefix, worker_id]))
        return None if flat is None else _from_flat(flat)

    def peek(self, model: str, limit: int = 1) -> list[Job]:
        if limit <= 0:
            return []
        # The queue can hold stale members (claim drops them as it meets them): read a few more than asked.
        members = self._redis.zrange(self._key("queue", model), 0, 2 * limit + 7)
        jobs = self._jobs([member.split(":", 1)[1] for member in members])
        return [job for job in jobs if job.status == JobStatus.QUEUED][:limit]

    def renew(self, job_id: str, worker_id: str, lease_seconds: float, now: float | None = None) -> bool:
        return bool(self._renew(args=[self.prefix, job_id, worker_id, _clock(now), repr(float(lease_seconds))]))

    def set_progress(self, job_id: str, worker_id: str, progress: float, stage: str | None = None) -> bool:
        progress = min(max(float(progress), 0.0), 1.0)
        args = [self.prefix, job_id, worker_id, repr(progress), "", "0" if stage is None else "1"]
        return bool(self._set_progress(args=[*args, stage or ""]))

    # Finish times and expiry, like leases, are on the server's clock: a worker whose clock ran ahead would
    # otherwise delete results early (`expired`), or date them wrong.
    def complete(self, job_id: str, worker_id: str, result: dict[str, Any], ttl: float, op: str | None = None) -> bool:
        ttl_arg = repr(float(ttl))
        return bool(self._once(self._complete, job_id, worker_id, "", ttl_arg, json.dumps(result), op=op))

    def fail(self, job_id: str, worker_id: str, code: str, message: str, ttl: float, op: str | None = None) -> bool:
        return bool(self._once(self._fail, job_id, worker_id, "", repr(float(ttl)), code, message, op=op))

    def mark_cancelled(self, job_id: str, worker_id: str, ttl: float, op: str | None = None) -> bool:
        return bool(self._once(self._mark_cancelled, job_id, worker_id, "", repr(float(ttl)), op=op))

    def release(self, job_id: str, worker_id: str) -> bool:
        return bool(self._once(self._release, job_id, worker_id, ""))

    def request_cancel(self, job_id: str, ttl: float, now: float | None = None) -> tuple[Job, bool]:
        reply = self._once(self._request_cancel, job_id, _clock(now), repr(float(ttl)))
        if reply is False:
            raise self._missing(job_id)
        ended, flat = reply
        return _from_flat(flat), bool(ended)

    def reap(self, max_attempts: int, ttl: float, now: float | None = None) -> list[Job]:
        args = [self.prefix, _clock(now), repr(float(ttl)), max_attempts, WORKER_LOST_MESSAGE]
        return [_from_flat(flat) for flat in self._reap(args=args)]

    def queue_position(self, job_id: str) -> int | None:
        place = int(self._position(args=[self.prefix, job_id]))
        if place < 0:
            raise self._missing(job_id)
        return place or None

    def queue_depth(self, model: str) -> int:
        return int(self._redis.zcard(self._key("queue", model)))

    def keyed(self, key: str) -> bool:
        job_id = self._redis.get(self._key("idem", key))
        return job_id is not None and bool(self._redis.exists(self._key("job", job_id)))

    def running_count(self, model: str) -> int:
        return int(self._redis.scard(self._key("running", model)))

    def counts(self, model: str) -> Counts:
        queued, running, workers = self._counts(args=[self.prefix, model])  # one script: one moment
        return Counts(int(queued), int(running), int(workers))

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[Job], bool]:
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        all_key = self._key("all")
        bound = "+inf" if order == "desc" else "-inf"
        if after is not None:
            seq = self._redis.zscore(all_key, after)
            if seq is None:
                seq = self._redis.get(self._key("gone", after))
            if seq is None:
                raise JobNotFound(after)
            bound = f"({int(seq)}"
        # Ids come from the index, records from their hashes: a job deleted between the two reads is skipped,
        # and the page is filled up from further on, so it never comes back short while more follow.
        jobs: list[Job] = []
        while True:
            wanted = limit + 1 - len(jobs)
            if order == "desc":
                batch = self._redis.zrevrangebyscore(all_key, bound, "-inf", start=0, num=wanted, withscores=True)
            else:
                batch = self._redis.zrangebyscore(all_key, bound, "+inf", start=0, num=wanted, withscores=True)
            jobs.extend(self._jobs([job_id for job_id, _ in batch]))
            if len(jobs) > limit:
                return jobs[:limit], True
            if len(batch) < wanted:
                return jobs, False
            bound = f"({int(batch[-1][1])}"

    def delete(self, job_id: str) -> Job:
        reply = self._once(self._delete, job_id, CURSOR_TTL_S)
        if reply == "missing":
            raise self._missing(job_id)
        if reply == "running":
            raise InvalidRequest("id", "the job is running; cancel it before deleting it")
        return _from_flat(reply)

    def expired(self, now: float | None = None, limit: int = 100, skip: int = 0) -> list[Job]:
        if now is None:
            seconds, micros = self._redis.time()
            now = seconds + micros / 1e6
        ids = self._redis.zrangebyscore(self._key("expiry"), "-inf", repr(now), start=skip, num=limit)
        return self._jobs(ids)

    def ping(self) -> bool:
        try:
            return bool(self._probe.ping())
        except (RedisError, OSError):
            return False

    def check_settings(self, warn: bool = True) -> None:
        """At start: a Redis that answers but refuses this URL (a wrong password, a database number it does not
        have, an ACL user that may not run scripts or write under the prefix) is a wrong setting, BadSetting now
        rather than every request failing later (a 500 for each submit); so is a TLS URL for a server that speaks
        no TLS. One that does not answer yet is waited out by whoever calls it, as during any outage. What it
        would lose jobs to (no append-only file, eviction) is said in the log (`warn`)."""
        try:
            self._probe.ping()
            self._probe.register_script(_LUA_COMMON + _CHECK)(args=[self.prefix])
        except (OutOfMemoryError, ReadOnlyError):  # full, or a failover: outages, waited out
            return
        except (AuthenticationError, ResponseError) as exc:
            raise BadSetting(f"{self._shown}: Redis refuses it: {exc}", "store") from None
        except (RedisError, OSError):
            if self._url.lower().startswith("rediss://") and _answers_without_tls(self._url):
                raise BadSetting(
                    f"{self._shown}: the server there speaks Redis without TLS: use redis://, or turn TLS on there",
                    "store",
                ) from None
            return
        if not warn:
            return
        try:
            problems = keeping_problems(self._probe)
        except RedisError:  # INFO refused (a managed service, an ACL without it): not judged
            return
        for problem in problems:
            log.warning("the job store %s: %s (docs/operations.md, section 1)", self._shown, problem)

    def close(self) -> None:
        self._probe.close()
        self._probe.connection_pool.disconnect()  # a pool passed in is not closed with its client
        self._redis.close()
