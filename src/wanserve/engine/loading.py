"""Find a model's files (tiny build, local directory, models_dir, HF cache, HF download) and load them
through diffusers' `from_pretrained` — one path for tiny test models and real checkpoints."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from wanserve.catalog import (
    ModelSpec,
    complete_snapshot,
    copy_of,
    models_dir_copy,
    repo_spec,
    resolve_spec,
    spec_from_directory,
)
from wanserve.config import Settings
from wanserve.errors import BadSetting, ModelNotFound, ModelUnavailable

log = logging.getLogger(__name__)

# One load at a time in a process (`wanserve serve` loads one model per worker thread). Loading changes
# process-wide state: diffusers and transformers call torch.set_default_dtype, accelerate's init_empty_weights
# patches nn.Module.register_parameter so that a module built meanwhile on any thread gets meta tensors, and
# their lazy imports race. `Engine.load` holds this lock through everything that builds modules (a preset's
# fused projections and FP8 wrappers, compilation, warm-up); re-entrant, as the helpers here take it too.
LOAD_LOCK = threading.RLock()


def locate(model: str, settings: Settings) -> tuple[ModelSpec, Path]:
    """The spec and the local directory of a model, downloading it from the Hub if needed."""
    spec = resolve_spec(model)
    if spec.tiny:
        from wanserve.engine.tiny import tiny_model_dir

        with LOAD_LOCK:
            try:
                path = tiny_model_dir(spec.name, settings.cache_dir)
            except OSError as exc:  # only tiny models need the folder: a real one may run from a read-only disk
                rule = f"{settings.cache_dir} cannot hold the tiny model: {exc.strerror or exc}"
                raise BadSetting(rule, "cache_dir") from None
        return spec_from_directory(path, base=spec), path
    if spec.local_path:
        return spec, Path(spec.local_path)
    local = models_dir_copy(spec, settings.models_dir)
    if local is not None:
        return copy_of(spec, local), local
    assert spec.repo_id is not None
    path = download(spec.repo_id, spec.name, settings.models_dir)
    if spec.repo_id == spec.name:  # a repo the catalog does not know: its files say what it is
        return repo_spec(spec_from_directory(path), spec.repo_id), path
    return spec_from_directory(path, base=spec), path


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids the Hub: a start then finds a model on disk or not at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def download(repo_id: str, name: str, models_dir: Path | None = None) -> Path:
    """A local snapshot of `repo_id`: from the HF cache if complete, else downloaded with a progress bar."""
    from huggingface_hub import snapshot_download

    cached = complete_snapshot(repo_id)
    if cached is not None:
        return cached
    # Not cached, or cut short: the Hub completes it.
    if hub_offline():
        raise ModelUnavailable(
            _how_to_fix(repo_id, name, "HF_HUB_OFFLINE is set and it is not in the HF cache", models_dir)
        )
    try:
        from huggingface_hub import HfApi

        _hub_timeouts()
        log.info("downloading %s from the Hugging Face Hub", repo_id)
        # The commit first, with a timeout: snapshot_download's own call for it passes none (waits for ever).
        revision = HfApi().repo_info(repo_id, revision="main", timeout=HUB_READ_TIMEOUT_S).sha
        snapshot = Path(snapshot_download(repo_id, revision=revision))
        # What snapshot_download writes when given a branch, not a commit: the cache's `main` names this
        # snapshot, so that the next start (offline too) finds it in the cache.
        ref = snapshot.parent.parent / "refs" / "main"
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(str(revision))
        return snapshot
    except Exception as exc:  # network errors, 401/404, disk full: all end the same way for the user
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ModelUnavailable(_how_to_fix(repo_id, name, reason, models_dir)) from exc


def hub_refuses(repo_id: str) -> str | None:
    """Why a start here could not download `repo_id` (the Hub unreachable, no such repo, a gated one without a
    token), asking what a start asks first; None when the Hub answers with the repo."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import ENDPOINT
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    gated = "it is gated on the Hub: accept its terms on its page, then `hf auth login` (or set HF_TOKEN)"
    _hub_timeouts()
    try:
        info = HfApi().repo_info(repo_id, revision="main", timeout=HUB_READ_TIMEOUT_S)
        if getattr(info, "gated", False):  # its description is open to all, its files to those let in
            try:
                HfApi().auth_check(repo_id)
            except HfHubHTTPError as exc:  # GatedRepoError; or, without a token, the Hub's 401 naming no reason
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if isinstance(exc, RepositoryNotFoundError) or status in (401, 403):
                    return gated
                raise
    except GatedRepoError:
        return gated
    except RepositoryNotFoundError:
        return "the Hub has no repo of that name (or it is private, and no HF_TOKEN is set)"
    except HfHubHTTPError as exc:
        return f"the Hugging Face Hub ({ENDPOINT}) answers {str(exc).splitlines()[0]}"
    except Exception as exc:  # connection refused, DNS, timeouts, a proxy's TLS: the network, for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the Hugging Face Hub ({ENDPOINT}) cannot be reached from here ({reason})"
    return None


# A Hub (or a proxy in front of it) that takes the connection and never answers: the client's own calls wait
# without end (its listing of the repo sets no timeout), and a start hung at "downloading" for good. A read
# times out per chunk, so a slow multi-GB download is not cut short.
HUB_CONNECT_TIMEOUT_S = 10.0
HUB_READ_TIMEOUT_S = 20.0


def _hub_timeouts() -> None:
    """Give the Hugging Face client's HTTP calls timeouts, where it takes a client factory (huggingface_hub 1.0
    and newer; older releases, on requests, time their calls out themselves)."""
    import huggingface_hub

    set_factory = getattr(huggingface_hub, "set_client_factory", None)
    if set_factory is None:
        return
    from huggingface_hub.utils import _http

    def timed_client() -> Any:
        client = _http.default_client_factory()
        client.timeout = type(client.timeout)(HUB_READ_TIMEOUT_S, connect=HUB_CONNECT_TIMEOUT_S)
        return client

    set_factory(timed_client)


def _how_to_fix(repo_id: str, name: str, reason: str, models_dir: Path | None) -> str:
    download = f"could not download {repo_id} from the Hugging Face Hub ({reason})."
    if Path(repo_id).parent.is_dir():  # `models/wan` names a folder here as well as a repo: say it is not one
        download += f" (Nor is there a folder {Path(repo_id).absolute()} here.)"
    if models_dir is not None:  # the user has said where local copies are: say where this one was looked for
        missing = "" if models_dir.is_dir() else f" ({models_dir} does not exist)"
        return (
            f"{name} is not in the models dir: no model_index.json in {models_dir / name} or "
            f"{models_dir / repo_id.split('/')[-1]}{missing}; and {download} "
            f"On a machine with network: `hf download {repo_id} --local-dir {models_dir / name}`, then copy it here."
        )
    return (
        f"{download} On a machine with network: `hf download {repo_id} --local-dir /models/{name}`, "
        f"then copy it here and pass `--model /models/{name}`, or set WANSERVE_MODELS_DIR=/models "
        f"(--models-dir /models) to keep serving it as {name}."
    )


def pipeline_class_name(path: Path) -> str:
    return json.loads((path / "model_index.json").read_text())["_class_name"]


def load_pipeline(path: Path, dtype: Any, vae_dtype: Any) -> Any:
    """Load the diffusers pipeline stored at `path` (class taken from its model_index.json)."""
    with LOAD_LOCK:
        try:
            return _load_pipeline(path, dtype, vae_dtype)
        except (MemoryError, ImportError):
            raise
        except Exception as exc:
            # A weight file cut short (an interrupted copy), an empty tokenizer folder: the config files passed
            # (spec_from_directory), the weights did not. Named, not a hundred lines of diffusers' traceback.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelNotFound(
                f"{path} could not be loaded ({type(exc).__name__}: {first[:500]}): a file in it may be damaged or "
                "cut short (compare its files' sizes with the Hub's)"
            ) from exc


def _load_pipeline(path: Path, dtype: Any, vae_dtype: Any) -> Any:
    import diffusers
    import transformers
    from diffusers import AutoencoderKLWan

    # Loading from local disk is quick; its per-component bars only clutter logs. Download bars stay.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(diffusers, pipeline_class_name(path))
    kwargs: dict[str, Any] = {"dtype": dtype}
    if vae_dtype != dtype:
        # The Wan VAE is kept in float32: bf16 decoding shows banding (as the diffusers docs advise).
        kwargs["vae"] = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=vae_dtype)
    if (path / "image_encoder").is_dir() and vae_dtype != dtype:
        from transformers import CLIPVisionModel

        kwargs["image_encoder"] = CLIPVisionModel.from_pretrained(path, subfolder="image_encoder", dtype=vae_dtype)
    return cls.from_pretrained(path, **kwargs)
