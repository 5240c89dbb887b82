"""One `Settings` object for every role. Each key is the env var `WANSERVE_<KEY>`; the most used also have a
CLI flag of the same name (docs/operations.md lists which)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from wanserve.errors import BadSetting

if TYPE_CHECKING:
    from wanserve.catalog import ModelSpec

Preset = Literal["exact", "fast", "fastest"]

# The longest a duration setting may be (ten years): infinity or 1e300 seconds passed every check, then broke
# the threads that turn it into a wait or a date (an expiry sweeper, a drain, a lease that never ran out).
MAX_SECONDS = 10 * 365 * 24 * 3600


def _seconds(default: float, *, positive: bool = True) -> float:
    bound = {"gt": 0} if positive else {"ge": 0}
    return Field(default=default, le=MAX_SECONDS, allow_inf_nan=False, **bound)  # type: ignore[no-any-return]


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wanserve"


def url_netloc_shown(parts: SplitResult) -> str:
    """The netloc of a URL as messages show it: a password in it (`https://user:pass@host`) is never printed."""
    if parts.password is None:
        return parts.netloc
    return f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[1]}"


def url_shown(url: str) -> str:
    try:
        parts = urlsplit(url)
        return urlunsplit(parts._replace(netloc=url_netloc_shown(parts)))
    except ValueError:  # no URL: nothing in it is known to be a password
        return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WANSERVE_", extra="ignore", validate_default=True)

    # What to serve. Comma-separated in env (WANSERVE_MODEL=tiny-t2v,tiny-i2v), repeatable on the CLI.
    model: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["tiny-t2v"])
    # An API replica's word for which served models run on sharding multi-GPU groups, when not all of them
    # do (then the layout settings say it for all): it refuses a step-cache preset for those at submit.
    sharded_model: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Where things live.
    data_dir: Path = Path("./data")
    store: str | None = None  # job store URL; default sqlite:///<data_dir>/jobs.db
    storage: str | None = None  # result storage URL; default file://<data_dir>/videos
    cache_dir: Path = Field(default_factory=_default_cache_dir)  # tiny models; compiled kernels in compile/
    models_dir: Path | None = None  # local copies of catalog models, looked up as <models_dir>/<name>

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(default=8088, ge=0, le=65535)
    ops_port: int = Field(default=8089, ge=0, le=65535)  # a standalone worker's /health, /metrics, /drain
    public_url: str | None = None  # base URL used in links handed to clients; default from the request
    web: bool = True  # serve the web page at /
    url: str | None = None  # the API `wanserve submit` sends jobs to; default http://<host>:<port>
    # Keys clients must send (`Authorization: Bearer <key>`, as the OpenAI SDK does, or `X-API-Key`); comma-
    # separated, so a new key can be rolled out before the old one is dropped. None: no key is asked for.
    api_key: SecretStr | None = None

    # Engine.
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    text_encoder_cpu: bool = False
    cpu_offload: bool = False
    vae_tiling: bool = False
    preset: Preset = "exact"
    # Regional compilation of the transformer blocks: auto = on CUDA only. Compiled kernels are kept under
    # <cache_dir>/compile (unless TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR say otherwise), so a restarted
    # worker with that folder on a volume loads them instead of compiling again.
    compile: Literal["auto", "on", "off"] = "auto"
    max_sequence_length: int = Field(default=512, ge=1, le=4096)
    # Text embeddings kept per engine (one per distinct prompt or negative prompt, 4 MiB each at 512 tokens):
    # the shared default negative prompt is encoded once, and a prefetched prompt waits here for its job.
    prompt_cache_size: int = Field(default=16, ge=0)

    # Multi-GPU layout: server configuration, fixed at start.
    ulysses: int = Field(default=1, ge=1)
    ring: int = Field(default=1, ge=1)
    cfg_parallel: int = Field(default=1, ge=1, le=2)
    fsdp: bool = False
    collective_timeout: float = _seconds(300.0)
    cfg_batch: bool = False  # one GPU: run the conditional and unconditional passes as one batch of 2

    # Jobs.
    lease_seconds: float = _seconds(30.0)
    max_attempts: int = Field(default=3, ge=1)
    task_timeout: float = _seconds(3600.0)
    # An engine call that has not come back this long after its job's task_timeout, or after a cancel it did not
    # act on, is stuck (a hung GPU): the job is ended and the worker's liveness fails. Longer than any VAE
    # decode or upload, so a slow stage is never taken for a hang.
    stuck_after: float = _seconds(600.0)
    shutdown_grace: float = _seconds(60.0, positive=False)
    queue_limit: int = Field(default=100, ge=1)
    result_ttl: float = _seconds(24 * 3600.0)  # seconds a finished job's files are kept
    progress_interval: float = _seconds(0.5, positive=False)  # min seconds between progress writes
    poll_interval: float = _seconds(0.2)  # worker's idle wait between claims
    # While a job denoises, encode the next queued job's prompt, and write/upload/complete the previous job's
    # video on another thread: the GPU goes from one job's last step to the next job's first without waiting.
    overlap_jobs: bool = True
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    storage_redirect: bool = False  # S3: redirect downloads to a presigned URL instead of streaming
    # Kubernetes: a worker marks its pod cheaper to delete while idle, so a scale-down stops idle workers
    # before busy ones (needs `patch` on pods for its service account; see wanserve/kube.py).
    pod_deletion_cost: bool = False

    @property
    def api_keys(self) -> tuple[str, ...]:
        if self.api_key is None:
            return ()
        return tuple(key.strip() for key in self.api_key.get_secret_value().split(",") if key.strip())

    @property
    def housekeeping_interval(self) -> float:
        """How often workers reap expired leases and every process sweeps expired results: a third of a lease,
        but never so often that a tiny lease (a test's, a typo's) turns it into a busy loop on the store."""
        return max(self.lease_seconds / 3, 0.5)

    def step_cache_for(self, spec: ModelSpec) -> bool:
        """Whether the workers of `spec` can run a step cache: the layout's word, and not one of the models the
        API was told run sharded."""
        return self.step_cache_possible and not spec.sharded

    @property
    def step_cache_possible(self) -> bool:
        """Whether this layout can run a step cache: not where ranks hold shards of one sequence (Ulysses, ring)
        or of the weights (FSDP), whose ranks would take different skip decisions and deadlock."""
        return self.ulysses * self.ring == 1 and not self.fsdp

    @field_validator("api_key")
    @classmethod
    def _some_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Set but empty (an empty Kubernetes secret, a stray comma) would quietly mean "no key asked for".
        if value is not None and not any(part.strip() for part in value.get_secret_value().split(",")):
            raise ValueError("is set but holds no key; unset it to run without keys")
        # Each key without the spaces around it (a secret made from a file ends in a newline), as api_keys reads it.
        keys = value.get_secret_value().split(",") if value is not None else []
        if not all(c.isascii() and c.isprintable() for key in keys for c in key.strip()):
            # An HTTP header carries ASCII: no client could send such a key (and the error must not show it).
            raise ValueError("holds a character that is not printable ASCII, which no HTTP header can carry")
        return value

    @field_validator("data_dir", "cache_dir", "models_dir", mode="before")
    @classmethod
    def _some_path(cls, value: object) -> object:
        # Set but empty would quietly mean the working directory. Spaces and a newline at the ends (a secret
        # made from a file) would name another folder than the other roles', and `~` the user's home in every
        # use, as a shell would have read it.
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("is set but empty; unset it to use the default")
            return Path(value.strip()).expanduser()
        if isinstance(value, Path):
            return value.expanduser()
        return value

    @field_validator("store", "storage", mode="before")
    @classmethod
    def _some_url(cls, value: object) -> object:
        # Set but empty (an empty Kubernetes secret) would quietly mean this host's own SQLite queue or folder:
        # an API replica and its workers would each have a queue of their own, jobs accepted and never run.
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("is set but empty; unset it to use the default under --data-dir")
            return value.strip()
        return value

    @field_validator("url", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():  # `export WANSERVE_URL=` clears it: the default, as if unset
            return None
        text = value.strip()
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"is not a URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, such as https://videos.example.com")
        if parts.query or parts.fragment or text.endswith(("?", "#")):  # paths are appended: ?x=1v1/videos
            raise ValueError(
                "must hold no query (?…) or fragment (#…): give the server's root, such as http://host:8088"
            )
        # The server's root: the OpenAI SDK's base_url ends in /v1, which would make every link /v1/v1/….
        root = text.rstrip("/").removesuffix("/v1").rstrip("/")
        path = parts.path.rstrip("/").removesuffix("/v1").rstrip("/")
        if path.endswith(("/v1/videos", "/v1")):
            hint = urlunsplit(parts._replace(netloc=url_netloc_shown(parts), path=path[: path.rfind("/v1")]))
            raise ValueError(f"names an API route, not the server's root: give {hint}")
        return root

    @field_validator("model", "sharded_model", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("model")
    @classmethod
    def _at_least_one(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one model must be served")
        if any(not name.strip() for name in value):
            raise ValueError("a model name is empty")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value.strip()

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def storage_url(self) -> str:
        return self.storage or f"file://{(self.data_dir / 'videos').resolve()}"

    @property
    def world_layout(self) -> int:
        """Processes one worker group needs for the configured layout."""
        return self.ulysses * self.ring * self.cfg_parallel


def world_size_from_env() -> int:
    """The processes of this torchrun group (`WORLD_SIZE`); 1 outside torchrun. Torch-free, as `process_rank`."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        # Set by torchrun, or by hand: a wrong value is a wrong setting, not a traceback.
        raise BadSetting(f"WORLD_SIZE: must be a number of processes, 1 or more (torchrun sets it), got {text!r}", "")
    return int(text)


def process_rank() -> int:
    """This process's rank under torchrun (`RANK`), 0 outside it or when RANK is not a number."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
