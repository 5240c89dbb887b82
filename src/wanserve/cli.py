"""The `wanserve` command. Flags are the `Settings` keys; each also reads from `WANSERVE_<KEY>`."""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wanserve.config import Settings, process_rank, url_shown, world_size_from_env
from wanserve.engine.device import LayoutError
from wanserve.errors import BadSetting, InvalidRequest, ModelNotFound, WanserveError
from wanserve.storage.base import ENDPOINT_ENV_VARS

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Serve the Wan 2.1 / 2.2 video models.", rich_markup_mode=None
)
# soft_wrap: a message is one line however narrow the output (a log is 80 columns), so that the command in it
# can be copied and pasted as it is.
console = Console(stderr=True, soft_wrap=True)


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if v is not None and v != []}


def where_set(key: str, overrides: dict[str, Any]) -> str:
    """How the user set the Settings key `key`: the flag when they gave it, else its environment variable."""
    return f"--{key.replace('_', '-')}" if key in _given(overrides) else f"WANSERVE_{key.upper()}"


# Variables wanserve reads itself, outside Settings.
_OTHER_VARIABLES = frozenset(name for name in ENDPOINT_ENV_VARS if name.startswith("WANSERVE_"))
# Kubernetes gives every pod `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT=tcp://ip:port`, `<SERVICE>_PORT_<n>_TCP…`
# for each Service of its namespace: for Services named wanserve or wanserve-*, these start with WANSERVE_.
_SERVICE_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://[^/\s]+:\d+")


def check_environment() -> None:
    """Say what in the environment wanserve ignores: a misspelt WANSERVE_ variable (pydantic-settings skips
    unknown names without a word), with the setting it may have meant; and a Kubernetes service link that would
    pass for a setting (`WANSERVE_PORT=tcp://…`, from a Service named wanserve), which is removed so the
    setting keeps its default."""
    services = {name.removesuffix("_SERVICE_HOST") for name in os.environ if name.endswith("_SERVICE_HOST")}
    known = {f"WANSERVE_{key.upper()}" for key in Settings.model_fields}
    quiet = process_rank() != 0  # under torchrun, rank 0 says it once
    for name in sorted(os.environ):
        if not name.startswith("WANSERVE_") or name in _OTHER_VARIABLES:
            continue
        value = os.environ[name]
        service = next((s for s in services if name.startswith((f"{s}_PORT", f"{s}_SERVICE_"))), None)
        if service is not None and (name not in known or _SERVICE_LINK_VALUE.fullmatch(value)):
            if name in known:  # a Service named like a setting: WANSERVE_PORT=tcp://10.0.0.7:8088
                del os.environ[name]
                if not quiet:
                    console.print(
                        f"[yellow]warning:[/yellow] {name}={escape(value)} is the Kubernetes service link of the "
                        f"Service {service.lower().replace('_', '-')}, not a setting: ignored (set "
                        "enableServiceLinks: false on the pod to drop these)"
                    )
            continue
        if name.upper() not in known and not quiet:  # pydantic-settings reads WANSERVE_port as WANSERVE_PORT
            close = difflib.get_close_matches(name, known | _OTHER_VARIABLES, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            console.print(f"[yellow]warning:[/yellow] {escape(name)} is not a wanserve setting; ignored{hint}")


def settings_from(**overrides: Any) -> Settings:
    """Settings from env, with the flags the user actually gave on top."""
    check_environment()
    try:
        return Settings(**_given(overrides))
    except ValidationError as exc:
        for error in exc.errors():
            key = str(error["loc"][0]) if error["loc"] else "?"
            message = str(error["msg"]).removeprefix("Value error, ")
            value = error.get("input")
            if key in ("url", "public_url") and isinstance(value, str):
                value = url_shown(value)  # a password in it is a secret too
            got = "" if key == "api_key" else f", got {value!r}"  # a key is a secret: not in a log
            console.print(f"[red]invalid setting:[/red] {escape(f'{where_set(key, overrides)}: {message}{got}')}")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> NoReturn:
    if console.quiet:  # a rank > 0 of a torchrun group (see generate): its error still shows, marked as its own
        console.quiet = False
        message = f"rank {os.environ.get('RANK')}: {message}"
    console.print(f"[red]error:[/red] {escape(message)}")  # user values may hold [brackets]: not markup
    raise typer.Exit(code)


def fail_setting(exc: BadSetting, overrides: dict[str, Any]) -> NoReturn:
    """A setting that cannot work here is a usage error (exit 2), named as the user set it."""
    if isinstance(exc, LayoutError) and world_size_from_env() > 1 and os.environ.get("LOCAL_RANK", "0") != "0":
        # The same settings and WORLD_SIZE give every rank the same words: one copy a node says it.
        raise typer.Exit(2)
    fail(f"{where_set(exc.setting, overrides)}: {exc.rule}" if exc.setting else exc.rule, code=2)


def setting(text: str, key: str, *decls: str) -> Any:
    """A typer.Option for the Settings key `key`, whose help names its environment variable."""
    return typer.Option(*decls, help=f"{text} [env WANSERVE_{key.upper()}]")


# Options shared by every command that runs the engine.
DeviceOpt = Annotated[str | None, setting("auto, cpu, cuda or cuda:N", "device")]
DtypeOpt = Annotated[str | None, setting("auto, bfloat16, float16 or float32", "dtype")]
TextCpuOpt = Annotated[
    bool | None,
    setting("keep the T5 text encoder on the CPU", "text_encoder_cpu", "--text-encoder-cpu/--no-text-encoder-cpu"),
]
OffloadOpt = Annotated[bool | None, setting("model CPU offload", "cpu_offload", "--cpu-offload/--no-cpu-offload")]
TilingOpt = Annotated[bool | None, setting("decode the VAE in tiles", "vae_tiling", "--vae-tiling/--no-vae-tiling")]
PresetOpt = Annotated[str | None, setting("acceleration preset: exact, fast or fastest", "preset")]
CompileOpt = Annotated[str | None, setting("compile the transformer blocks: auto (CUDA only), on or off", "compile")]
CacheOpt = Annotated[Path | None, setting("where tiny models are built and compiled kernels kept", "cache_dir")]
ModelsDirOpt = Annotated[Path | None, setting("local copies of catalog models, as <dir>/<name>", "models_dir")]
# The multi-GPU layout: fixed when the process starts (under torchrun), never per request.
UlyssesOpt = Annotated[int | None, setting("Ulysses sequence-parallel degree (under torchrun)", "ulysses")]
RingOpt = Annotated[int | None, setting("ring-attention sequence-parallel degree (under torchrun)", "ring")]
CfgParallelOpt = Annotated[int | None, setting("2: guidance passes on two rank groups", "cfg_parallel")]
FsdpOpt = Annotated[bool | None, setting("shard weights over the ranks", "fsdp", "--fsdp/--no-fsdp")]
CfgBatchOpt = Annotated[
    bool | None, setting("both guidance passes as one batch", "cfg_batch", "--cfg-batch/--no-cfg-batch")
]
OverlapOpt = Annotated[
    bool | None,
    setting(
        "encode the next queued prompt and store the previous video while a job denoises (default on)",
        "overlap_jobs",
        "--overlap-jobs/--no-overlap-jobs",
    ),
]


# The request's flags, shared by `generate` (runs it here) and `submit` (sends it to a server).
PromptOpt = Annotated[str, typer.Option(help="what the video shows")]
ImageOpt = Annotated[Path | None, typer.Option(help="input image for image-to-video")]
NegativeOpt = Annotated[str | None, typer.Option(help="what to avoid")]
SizeOpt = Annotated[
    str | None, typer.Option(help="WIDTHxHEIGHT, e.g. 832x480; with --image, by default the image's shape")
]
FramesOpt = Annotated[int | None, typer.Option(help="number of frames, 4k+1")]
FpsOpt = Annotated[int | None, typer.Option(help="frames per second of the MP4")]
StepsOpt = Annotated[int | None, typer.Option(help="denoising steps")]
GuidanceOpt = Annotated[float | None, typer.Option(help="classifier-free guidance scale")]
Guidance2Opt = Annotated[float | None, typer.Option(help="guidance of the second expert (A14B)")]
BoundaryOpt = Annotated[float | None, typer.Option(help="expert switch point (A14B)")]
ShiftOpt = Annotated[float | None, typer.Option(help="scheduler flow shift")]
SeedOpt = Annotated[int | None, typer.Option(help="random seed; the same seed gives the same video")]


@app.command()
def generate(
    prompt: PromptOpt,
    out: Annotated[
        str, typer.Option(help="the MP4 to write (its name ends in .mp4); a WebP thumbnail is written beside it")
    ] = "wanserve.mp4",
    model: Annotated[
        str | None, setting("catalog name, alias, local directory or repo id (default tiny-t2v)", "model")
    ] = None,
    image: ImageOpt = None,
    negative_prompt: NegativeOpt = None,
    size: SizeOpt = None,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    guidance_2: Guidance2Opt = None,
    boundary_ratio: BoundaryOpt = None,
    flow_shift: ShiftOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    text_encoder_cpu: TextCpuOpt = None,
    cpu_offload: OffloadOpt = None,
    vae_tiling: TilingOpt = None,
    preset: PresetOpt = None,
    compile: CompileOpt = None,
    cache_dir: CacheOpt = None,
    models_dir: ModelsDirOpt = None,
    ulysses: UlyssesOpt = None,
    ring: RingOpt = None,
    cfg_parallel: CfgParallelOpt = None,
    fsdp: FsdpOpt = None,
    cfg_batch: CfgBatchOpt = None,
) -> None:
    """Generate one video and write it as an MP4, with a live progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wanserve.request import GenerationRequest, parse_size

    overrides: dict[str, Any] = dict(
        model=[model] if model is not None else None,
        device=device,
        dtype=dtype,
        text_encoder_cpu=text_encoder_cpu,
        cpu_offload=cpu_offload,
        vae_tiling=vae_tiling,
        preset=preset,
        compile=compile,
        cache_dir=cache_dir,
        models_dir=models_dir,
        ulysses=ulysses,
        ring=ring,
        cfg_parallel=cfg_parallel,
        fsdp=fsdp,
        cfg_batch=cfg_batch,
    )
    settings = settings_from(**overrides)
    if len(settings.model) != 1:
        fail(f"WANSERVE_MODEL: names {len(settings.model)} models; generate runs one: pass --model", code=2)
    model = settings.model[0]
    try:
        # Under torchrun every rank runs this command; rank 0 alone reports, so the output reads as one run's.
        # (RANK alone, without a group, is a pod's own variable: the only process says what it did.)
        console.quiet = process_rank() != 0 and world_size_from_env() > 1
        width, height = parse_size(size, "--size") if size else (None, None)
        image_bytes = read_image(image) if image is not None else None
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=image_bytes,
            width=width,
            height=height,
            num_frames=frames,
            fps=fps,
            num_inference_steps=steps,
            guidance_scale=guidance,
            guidance_scale_2=guidance_2,
            boundary_ratio=boundary_ratio,
            flow_shift=flow_shift,
            seed=seed,
        )
        # Check the request against the model before paying for loading it.
        # (An unknown repo id is described only once its files are here, so it is checked after loading.)
        from wanserve.catalog import lookup, resolve_spec
        from wanserve.request import resolve

        spec = resolve_spec(model)
        if lookup(model) is not None or spec.local_path:
            resolve(request, spec)

        from wanserve.roles import check_engine_settings

        check_engine_settings(settings)
        out_file = check_output(out, image)  # after the request's checks: a refused request leaves no folder
        if world_size_from_env() == 1 and settings.world_layout == 1:
            from wanserve.engine.loading import locate

            # Before the spinner, which holds the terminal: a download's own progress bar shows. (A torchrun
            # group checks its layout first, in Engine.load.)
            try:
                locate(model, settings)
            except OSError as exc:
                fail(f"could not load {model}: {type(exc).__name__}: {exc}")
        with console.status(f"loading {escape(model)}…"):
            from wanserve.engine.engine import Engine

            try:
                engine = Engine.load(model, settings)
            except OSError as exc:  # not the output's fault: the handler below is for writing it
                fail(f"could not load {model}: {type(exc).__name__}: {exc}")

        def describe(event: Any) -> str:
            expert = f" expert {event.expert + 1}" if engine.spec.two_experts else ""
            return f"step {event.step}/{event.total_steps} {event.step_seconds:.2f}s{expert}"

        if not console.is_terminal:
            # Logs (CI, containers, pipes) get one plain line per event instead of a redrawn bar.
            def on_progress(event: Any) -> None:
                if event.stage == "denoise":
                    console.print(f"denoising {describe(event)}")
                elif event.seconds is not None:
                    console.print(f"{event.stage.replace('_', ' ')} {event.seconds:.2f}s")

            result = engine.generate(request, out_file, on_progress=on_progress)
        else:
            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
            ) as bar:
                task = bar.add_task("encoding prompt", total=None, detail="")

                def on_progress(event: Any) -> None:
                    if event.stage == "denoise":
                        bar.update(
                            task,
                            description="denoising",
                            completed=event.step,
                            total=event.total_steps,
                            detail=describe(event),
                        )
                    elif event.stage in ("vae_decode", "video_encode"):
                        bar.update(task, description=event.stage.replace("_", " "))

                result = engine.generate(request, out_file, on_progress=on_progress)
    except InvalidRequest as exc:  # name the flag the user typed, not the request field behind it
        fail(f"{FLAG_OF_FIELD.get(exc.field, exc.field)}: {exc.rule}", code=2)
    except BadSetting as exc:
        fail_setting(exc, overrides)
    except WanserveError as exc:
        fail(str(exc))
    except OSError as exc:  # the checks above cannot foresee everything: a full disk, a folder removed meanwhile
        fail(f"--out: could not write {out}: {exc}")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    # Not highlighted: rich colours half of each number ("0." of "0.66s").
    console.print(
        f"seed {result.seed} · {result.width}x{result.height} · {result.num_frames} frames · {timings}", highlight=False
    )
    if not console.quiet:
        print(result.video_path)


# Request fields as `generate` spells them, for errors found by the request rules.
FLAG_OF_FIELD = {
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "image": "--image",
    "width": "--size",
    "height": "--size",
    "size": "--size",
    "num_frames": "--frames",
    "fps": "--fps",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "guidance_scale_2": "--guidance-2",
    "boundary_ratio": "--boundary-ratio",
    "flow_shift": "--flow-shift",
    "seed": "--seed",
}


def _check_writable(folder: Path, key: str) -> None:
    """Raise a BadSetting for `key` unless `folder` exists, or can be made, and takes files."""
    try:
        folder.expanduser().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder.expanduser()):
            pass
    except OSError as exc:
        raise BadSetting(f"{folder} cannot hold files: {exc.strerror or exc}", key) from None


def check_output(out: str, image: Path | None) -> Path:
    """Refuse, before any model is loaded, an --out that could not hold the video and its thumbnail, or whose
    writing would replace the --image it is made from."""
    from wanserve.engine.video import check_output_path, thumbnail_path_for

    if out.rstrip("/" + os.sep) and out.endswith(("/", os.sep)):  # Path forgets the slash: a file named `dir`
        fail(f"--out: {out!r} names a folder: give the MP4's path in it, such as {out}fox.mp4", 2)
    path = Path(out)
    try:
        check_output_path(path)
    except InvalidRequest as exc:
        fail(f"--out: {exc.rule}", 2)
    if image is not None and image.is_file():
        for written in (path, thumbnail_path_for(path)):
            if written.is_file() and os.path.samefile(written, image):
                what = "the video" if written == path else f"the thumbnail, {written},"
                fail(f"--out: {what} would be written over --image {image}: give the video another name", 2)
    return path


def read_image(image: Path) -> bytes:
    if not image.is_file():
        fail(f"--image: {image} is not a file" if image.exists() else f"--image: {image} does not exist", 2)
    try:
        return image.read_bytes()
    except OSError as exc:
        fail(f"--image: cannot read {image}: {exc.strerror or exc}", 2)


# A server's names for request fields that `submit` sends under another flag than generate's table says.
SUBMIT_FLAG_OF_FIELD = {
    **FLAG_OF_FIELD,
    "input_reference": "--image",
    "model": "--model",
    "priority": "--priority",
    "preset": "--preset",
}


@app.command()
def submit(
    prompt: PromptOpt,
    url: Annotated[
        str | None, setting("the wanserve API to send the job to (default http://<host>:<port>)", "url")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="a model the server serves (default: the first served that does the task)")
    ] = None,
    image: ImageOpt = None,
    negative_prompt: NegativeOpt = None,
    size: SizeOpt = None,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    guidance_2: Guidance2Opt = None,
    boundary_ratio: BoundaryOpt = None,
    flow_shift: ShiftOpt = None,
    seed: SeedOpt = None,
    priority: Annotated[int | None, typer.Option(help="higher runs first, -1000 to 1000 (default 0)")] = None,
    preset: Annotated[str | None, typer.Option(help="exact, fast or fastest (default: the workers')")] = None,
    out: Annotated[
        str | None, typer.Option(help="MP4 to write, a WebP thumbnail beside it (default <video id>.mp4)")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="follow the job and download the video; --no-wait prints its id")
    ] = True,
) -> None:
    """Send a job to a running wanserve (`serve` or `api`), follow its queue place and progress, and download
    the MP4. Ctrl-C while it waits cancels the job. The key is WANSERVE_API_KEY, as on the server."""
    from wanserve.client import ApiError, Client, NotAnApi, Unreachable
    from wanserve.engine.video import thumbnail_path_for
    from wanserve.request import parse_size

    overrides: dict[str, Any] = dict(url=url)
    settings = settings_from(**overrides)
    base = settings.url or f"http://{_connect_host(settings.host)}:{settings.port}"
    if out is not None and not wait:
        fail("--out: nothing is downloaded with --no-wait (it prints the job's id); leave one of them out", 2)
    for flag, number in (
        ("--guidance", guidance),
        ("--guidance-2", guidance_2),
        ("--boundary-ratio", boundary_ratio),
        ("--flow-shift", flow_shift),
    ):
        if number is not None and not math.isfinite(number):  # JSON has no NaN or infinity to send them as
            fail(f"{flag}: must be a finite number, got {number}", 2)
    # Before the job is sent: a video nobody can write is a GPU's time wasted. (The default name, the job's id,
    # is known later; its folder is the working directory.) With --no-wait nothing is written here.
    if wait:
        check_output(out if out is not None else ".wanserve-submit.mp4", image)
    out_file = Path(out) if out is not None else None  # --out without --wait was refused above
    fields: dict[str, Any] = {
        "prompt": prompt,
        "model": model,
        "negative_prompt": negative_prompt,
        "num_frames": frames,
        "fps": fps,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "guidance_scale_2": guidance_2,
        "boundary_ratio": boundary_ratio,
        "flow_shift": flow_shift,
        "seed": seed,
        "priority": priority,
        "preset": preset,
    }
    if size is not None:
        try:
            width, height = parse_size(size, "--size")
        except InvalidRequest as exc:
            fail(f"--size: {exc.rule}", 2)
        fields["size"] = f"{width}x{height}"
    fields = {name: value for name, value in fields.items() if value is not None}
    for name in ("prompt", "negative_prompt"):  # a byte that is not UTF-8 in an argument: a traceback in httpx
        try:
            str(fields.get(name, "")).encode("utf-8")
        except UnicodeEncodeError:
            fail(f"--{name.replace('_', '-')}: must be UTF-8 text: it holds a byte that is not UTF-8", 2)
    # The file's name is only a hint in the form: one that is not UTF-8 is sent with its bad bytes replaced.
    name = image.name.encode("utf-8", "replace").decode("utf-8") if image is not None else ""
    upload = (name, read_image(image)) if image is not None else None
    # A closed terminal, `timeout` or a CI job's stop is Ctrl-C's: the job cancelled, no part file left behind.
    for stop in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(stop) is not signal.SIG_IGN:  # `nohup wanserve submit &` keeps its job on logout
            signal.signal(stop, _interrupted)
    client = Client(base, settings.api_keys[0] if settings.api_keys else None)
    outage = _Outage()
    # Every try sends the same key: a try whose answer was lost (a timeout, a dropped connection, a store that
    # stalled after queueing it) is answered by the next with the job it made, never a second job.
    key = f"wanserve-submit-{uuid.uuid4().hex}"
    heard = False  # a wanserve answered at this URL: a lost answer is then worth sending again for
    full = False  # the last answer was a full queue: nothing was queued (a key whose job exists is replayed)
    try:
        try:  # around the waits too: a Ctrl-C while one sleeps (inside an except clause) escaped its siblings
            while True:
                try:
                    video = client.create(fields, upload, key)
                    break
                except ApiError as exc:
                    if exc.status not in (429, 503):  # a full queue or a store restarting: the job is not taken yet
                        _refused(exc, client, upload is not None, key)
                    heard, full = True, exc.status == 429
                    outage.wait(exc.message, exc.retry_after, "the queue has room again" if full else None)
                except Unreachable as exc:
                    full = False
                    # Tried again only where a wanserve was heard: a connection refused, or one reset or closed by
                    # whatever listens there (TLS, Redis) is most likely the wrong URL.
                    heard = heard or outage.since is not None or (exc.delivered and client.is_wanserve())
                    if not heard:
                        maybe = f"; {_maybe_taken(key)}" if exc.delivered else ""
                        fail(f"{exc} (is `wanserve serve` running there? --url / WANSERVE_URL names another){maybe}")
                    outage.wait(str(exc), None)
                except NotAnApi as exc:
                    fail(f"{exc} (--url / WANSERVE_URL names another server)")
        except KeyboardInterrupt:
            if full:
                fail("interrupted while the queue was full: the job was not queued", 130)
            fail(f"interrupted while sending the job: {_maybe_taken(key)}", 130)
        outage.over()
        video_id = video["id"]
        outage.ctrl_c = "Ctrl-C cancels the job"
        if not wait:
            print(video_id)
            return
        shown = [
            f"{video[name]}{unit}"
            for name, unit in (("model", ""), ("size", ""), ("num_frames", " frames"), ("seed", ""))
            if video.get(name) is not None
        ]
        if video.get("seed") is not None:  # an OpenAI-like server may leave wanserve's fields out
            shown[-1] = f"seed {shown[-1]}"
        console.print(escape(f"{video_id}: {', '.join(shown)}"))  # the server's words: `[beta]` is no markup
        try:
            video = _follow(client, video, outage)
        except KeyboardInterrupt:
            _cancel_on_interrupt(client, video_id, client.url)
        if video["status"] != "completed":
            error = video.get("error") or {}
            if error.get("code") == "cancelled":
                fail(f"{video_id} was cancelled")
            fail(f"{video_id} failed: {error.get('code')}: {error.get('message')}")
        target = out_file or Path(f"{video_id}.mp4")
        outage.ctrl_c = "Ctrl-C stops; the video stays on the server"
        for variant, path in (("video", target), ("thumbnail", thumbnail_path_for(target))):
            what = "MP4" if variant == "video" else "thumbnail"
            try:  # around the waits too, as above
                while True:
                    try:
                        client.download(video_id, path, variant)
                        break
                    except Unreachable as exc:  # the file is stored: a restart or an outage is waited out
                        outage.wait(str(exc), None)
                    except ApiError as exc:
                        if exc.status != 503:
                            fail(f"{video_id} is done, but its {what} could not be downloaded: {exc}")
                        outage.wait(exc.message, exc.retry_after)
                    except NotAnApi as exc:  # a proxy that routes the API but not /content
                        fail(f"{video_id} is done, but its {what} could not be downloaded: {exc}")
                    except OSError as exc:
                        fail(f"--out: could not write {path}: {exc.strerror or exc}")
            except KeyboardInterrupt:
                query = "?variant=thumbnail" if variant != "video" else ""
                fail(
                    f"interrupted: {video_id} is completed, its {what} not downloaded: "
                    f"GET {client.url}/v1/videos/{video_id}/content{query}",
                    130,
                )
            outage.over()
        timings = video.get("timings") or {}
        took = f" in {timings['total']:.1f} s" if timings.get("total") is not None else ""
        console.print(escape(f"{video_id}: completed{took}"))
        print(target)
    finally:
        client.close()


def _connect_host(host: str) -> str:
    """Where a server bound to `host` is reached from this machine: a wildcard bind answers on loopback."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _key_refused(client: Any, video_id: str | None = None) -> NoReturn:
    """`video_id`: a job already queued (the server's keys changed while it was followed), which goes on."""
    kept = f" ({video_id} is still on the server: follow it with a key the server takes)" if video_id else ""
    if client.key is None:
        fail(f"the server asks for an API key: set WANSERVE_API_KEY to one of its keys{kept}", 2)
    fail(f"WANSERVE_API_KEY: the server refused this key (not one of its WANSERVE_API_KEY keys){kept}", 2)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _maybe_taken(key: str) -> str:
    return (
        "if the server took the job, GET /v1/videos lists it "
        f"(sent with Idempotency-Key: {key}; sending it again with that key gives its id)"
    )


def _refused(exc: Any, client: Any, with_image: bool, key: str) -> NoReturn:
    """A refused job, worded as generate words its own checks: the flag, then the rule."""
    if exc.status == 401:
        _key_refused(client)
    if exc.status in (400, 413, 422) and exc.param:
        flag = SUBMIT_FLAG_OF_FIELD.get(exc.param, exc.param)
        fail(f"{flag}: {exc.message.removeprefix(f'{exc.param}: ')}", 2)
    if exc.status == 413 and with_image:  # a proxy's own limit (nginx: 1 MiB), before the server saw it
        fail(f"--image: the request was too large for the server or a proxy in front of it ({exc.message})", 2)
    if exc.status >= 500:  # the server failed while taking it: it may be queued all the same
        fail(f"the server failed while taking the job: {exc.message}; {_maybe_taken(key)}")
    retry = f" (try again in {exc.retry_after} s)" if exc.retry_after else ""
    fail(f"the server refused the job: {exc.message}{retry}")


class _Outage:
    """A server (or its store) that does not answer for a while, waited out: said once when it starts and once
    when it ends, not at every try."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.ended = "the server answers again"
        self.ctrl_c = "Ctrl-C stops"  # what Ctrl-C does now: once the job is taken, it cancels it

    def wait(self, why: str, retry_after: str | None, ended: str | None = None) -> None:
        """`ended`: what its end is said as (a full queue was answered all along: it has room again)."""
        if self.since is None:
            self.since = time.monotonic()
            console.print(f"[yellow]warning:[/yellow] {escape(why)}; still trying ({self.ctrl_c})")
        self.ended = ended or "the server answers again"
        time.sleep(int(retry_after) if retry_after and retry_after.isdigit() else 2)

    def over(self) -> None:
        if self.since is not None:
            console.print(self.ended)
            self.since = None


def _follow(client: Any, video: dict[str, Any], outage: _Outage) -> dict[str, Any]:
    """Poll until the job ends, showing its queue place, stage and progress; through a server restart (the
    job is durable) or a store outage, say so once and keep asking."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from wanserve.client import ApiError, NotAnApi, Unreachable

    def describe(v: dict[str, Any]) -> str:
        if v["status"] == "queued":
            return f"queued, #{v['queue_position']}" if v.get("queue_position") else "queued"
        return str(v.get("stage") or "starting").replace("_", " ")

    delay = 0.0
    last = ""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(describe(video), total=100, completed=video["progress"])
        while video["status"] in ("queued", "in_progress"):
            time.sleep(delay)
            delay = 0.0
            try:
                video, delay = client.retrieve(video["id"])
            except (Unreachable, NotAnApi) as exc:  # a restart, or a proxy's page in its place meanwhile
                outage.wait(str(exc), None)
                continue
            except ApiError as exc:
                if exc.status == 404:
                    outage.over()
                    fail(
                        f"the server no longer knows {video['id']}: deleted, expired, or the server now uses "
                        "another job store"
                    )
                if exc.status == 401:
                    _key_refused(client, video["id"])
                outage.wait(exc.message, exc.retry_after)
                continue
            outage.over()
            bar.update(task, description=describe(video), completed=video["progress"])
            # Logs (CI, containers, pipes) get a line per change instead of a redrawn bar.
            line = f"{describe(video)} {video['progress']}%"
            if not console.is_terminal and line != last and video["status"] in ("queued", "in_progress"):
                console.print(line)
                last = line
    return video


def _cancel_on_interrupt(client: Any, video_id: str, base: str) -> NoReturn:
    """Says what the cancel's answer says: the job may have ended since it was last read."""
    from wanserve.client import ApiError, NotAnApi, Unreachable

    try:
        video = client.cancel(video_id)
    except (ApiError, Unreachable, NotAnApi) as exc:
        fail(f"interrupted; {video_id} could not be cancelled: {exc}", 130)
    error = video.get("error") or {}
    if video["status"] == "completed":
        fail(f"interrupted: {video_id} had completed already: GET {base}/v1/videos/{video_id}/content", 130)
    if video["status"] == "failed" and error.get("code") != "cancelled":
        fail(f"interrupted: {video_id} had failed already: {error.get('code')}: {error.get('message')}", 130)
    if video["status"] == "in_progress":
        fail(f"interrupted: {video_id} is being cancelled (it stops after its current step)", 130)
    fail(f"interrupted: {video_id} cancelled", 130)


ModelsOpt = Annotated[list[str] | None, setting("model to serve; repeat for several (env: a,b)", "model", "--model")]
WorkerModelOpt = Annotated[list[str] | None, setting("the one model this worker serves", "model", "--model")]
DataDirOpt = Annotated[Path | None, setting("data directory (default ./data)", "data_dir")]
StoreOpt = Annotated[
    str | None, setting("job store URL: sqlite:////abs/path.db, sqlite:///rel.db or redis://host:6379/0", "store")
]
StorageOpt = Annotated[str | None, setting("result storage URL: file:///dir or s3://bucket/prefix", "storage")]
HostOpt = Annotated[str | None, setting("bind address (default 127.0.0.1)", "host")]
PortOpt = Annotated[int | None, setting("HTTP port (default 8088)", "port")]
WebOpt = Annotated[bool | None, setting("serve the web page at / (default on)", "web", "--web/--no-web")]


def _run_role(role: str, **overrides: Any) -> None:
    from wanserve import roles

    settings = settings_from(**overrides)
    try:
        {"serve": roles.run_serve, "api": roles.run_api, "worker": roles.run_worker}[role](settings)
    except BadSetting as exc:
        fail_setting(exc, overrides)
    except (WanserveError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk, a folder it may not read: one line, not a traceback
        fail(f"{type(exc).__name__}: {exc}")


@app.command()
def serve(
    model: ModelsOpt = None,
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    storage: StorageOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    web: WebOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    text_encoder_cpu: TextCpuOpt = None,
    cpu_offload: OffloadOpt = None,
    vae_tiling: TilingOpt = None,
    preset: PresetOpt = None,
    compile: CompileOpt = None,
    cache_dir: CacheOpt = None,
    models_dir: ModelsDirOpt = None,
    cfg_batch: CfgBatchOpt = None,
    overlap_jobs: OverlapOpt = None,
) -> None:
    """API, durable queue and one resident worker per model, in one process (tiny-t2v by default)."""
    _run_role("serve", **locals())  # every parameter is a Settings key


# The API runs no engine, but checks each request's `preset` against what its workers can serve: it takes
# their preset and layout, worded for that.
FleetPresetOpt = Annotated[
    str | None, setting("the workers' preset (exact, fast or fastest): requests are checked against it", "preset")
]
FleetUlyssesOpt = Annotated[int | None, setting("the workers' Ulysses degree (no step cache above 1)", "ulysses")]
FleetRingOpt = Annotated[int | None, setting("the workers' ring degree (no step cache above 1)", "ring")]
FleetFsdpOpt = Annotated[bool | None, setting("the workers shard weights (no step cache)", "fsdp", "--fsdp/--no-fsdp")]
ShardedOpt = Annotated[
    list[str] | None,
    setting(
        "a served model whose workers alone are sharding multi-GPU groups (no step cache); repeat for several "
        "(env: a,b)",
        "sharded_model",
        "--sharded-model",
    ),
]


@app.command()
def api(
    model: ModelsOpt = None,
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    storage: StorageOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    web: WebOpt = None,
    preset: FleetPresetOpt = None,
    ulysses: FleetUlyssesOpt = None,
    ring: FleetRingOpt = None,
    fsdp: FleetFsdpOpt = None,
    sharded_model: ShardedOpt = None,
) -> None:
    """A stateless API replica (no torch): run any number against one Redis store and shared storage. Give it
    the workers' --preset and layout (or, where only some models run on sharding groups, --sharded-model for
    each), so that it refuses at submit what they could not run."""
    _run_role("api", **locals())  # every parameter is a Settings key


@app.command()
def worker(
    model: WorkerModelOpt = None,
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    storage: StorageOpt = None,
    host: HostOpt = None,
    ops_port: Annotated[
        int | None, setting("port of /health, /ready, /metrics, /drain (default 8089)", "ops_port")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    text_encoder_cpu: TextCpuOpt = None,
    cpu_offload: OffloadOpt = None,
    vae_tiling: TilingOpt = None,
    preset: PresetOpt = None,
    compile: CompileOpt = None,
    cache_dir: CacheOpt = None,
    models_dir: ModelsDirOpt = None,
    lease_seconds: Annotated[
        float | None, setting("lease of a running job (renewed every step)", "lease_seconds")
    ] = None,
    shutdown_grace: Annotated[
        float | None, setting("seconds a draining worker may finish its job", "shutdown_grace")
    ] = None,
    ulysses: UlyssesOpt = None,
    ring: RingOpt = None,
    cfg_parallel: CfgParallelOpt = None,
    fsdp: FsdpOpt = None,
    cfg_batch: CfgBatchOpt = None,
    overlap_jobs: OverlapOpt = None,
) -> None:
    """One GPU worker for one model. SIGTERM or POST /drain: finish or hand back the job, exit 0."""
    _run_role("worker", **locals())  # every parameter is a Settings key


def model_guidance(spec: Any) -> str:
    """The guidance column, as the README's table writes it (`4.0 / 3.0, boundary 0.875` for two experts)."""
    guidance = f"{spec.guidance_scale:.1f}"
    if spec.two_experts:
        guidance += f" / {spec.guidance_scale_2:.1f}, boundary {spec.boundary_ratio:.3f}"
    return guidance


@app.command()
def models() -> None:
    """The model catalog: names, aliases, tasks and official defaults."""
    from wanserve.catalog import ALL_SPECS

    table = Table(title="wanserve models")
    for column in (
        "name",
        "aliases",
        "tasks",
        "Hugging Face repo",
        "default size",
        "frames",
        "fps",
        "steps",
        "guidance",
        "flow shift",
    ):
        table.add_column(column, overflow="fold")  # a cut name could not be typed back: fold it
    for spec in ALL_SPECS:
        guidance = model_guidance(spec)
        table.add_row(
            spec.name,
            ", ".join(spec.aliases),
            spec.task_label,
            spec.repo_id or "built offline",
            f"{spec.width}x{spec.height}",
            str(spec.num_frames),
            str(spec.fps),
            str(spec.num_inference_steps),
            guidance,
            f"{spec.flow_shift:.1f}",
        )
    Console(width=None if sys.stdout.isatty() else 240).print(table)  # piped: as wide as the table needs


@app.command()
def doctor(
    model: ModelsOpt = None,
    store: Annotated[str | None, setting("job store URL to check", "store")] = None,
    storage: Annotated[str | None, setting("result storage URL to check", "storage")] = None,
    data_dir: DataDirOpt = None,
    cache_dir: CacheOpt = None,
    models_dir: ModelsDirOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Check this machine: each line is OK or a fix to try."""
    from wanserve.doctor import run_checks

    overrides = dict(
        model=model,
        store=store,
        storage=storage,
        data_dir=data_dir,
        cache_dir=cache_dir,
        models_dir=models_dir,
        device=device,
    )
    settings = settings_from(**overrides)
    failed = 0
    report = Console(soft_wrap=True)  # the report on stdout (`wanserve doctor | grep FIX`); warnings stay on stderr
    for check in run_checks(settings, lambda key: where_set(key, overrides)):
        mark = "[green]OK[/green]  " if check.ok else "[red]FIX[/red] "
        report.print(f"{mark} {check.name}: {escape(check.detail)}")
        failed += 0 if check.ok else 1
    raise typer.Exit(1 if failed else 0)


@app.command()
def prune(
    older_than: Annotated[
        float, typer.Option(min=0.1, help="hours since a folder was last written, at least (default 24)")
    ] = 24.0,
    delete: Annotated[bool, typer.Option("--delete", help="delete what is found (else only list it)")] = False,
    empty_store_ok: Annotated[
        bool,
        typer.Option("--empty-store-ok", help="delete even though the job store holds no job at all"),
    ] = False,
    store: StoreOpt = None,
    storage: StorageOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List (or --delete) result files that belong to no job: left behind when job records were lost."""
    from wanserve.errors import StorageUnavailable, StoreUnavailable
    from wanserve.jobs import redacted, sqlite_path
    from wanserve.prune import find_orphans
    from wanserve.roles import open_backends
    from wanserve.storage import local_storage_path

    overrides = {"store": store, "storage": storage, "data_dir": data_dir}
    settings = settings_from(**overrides)
    for key, local_path in (("store", sqlite_path), ("storage", local_storage_path)):
        # The one the user set: the store or storage itself, else the data dir its default lies under.
        named = where_set(key if getattr(settings, key) is not None else "data_dir", overrides)
        try:
            path = local_path(getattr(settings, f"{key}_url"))
        except ValueError as exc:
            fail(f"{named}: {exc}", 2)
        # Opening a missing one would make an empty one, in which every file looks orphaned.
        if path is not None and not path.exists():
            fail(f"{named}: nothing at {path} (is it the one the server uses?)", 2)
    try:
        job_store, result_storage = open_backends(settings, writes=delete)
    except BadSetting as exc:
        fail_setting(exc, overrides)
    except (StoreUnavailable, StorageUnavailable) as exc:
        fail(str(exc))
    try:
        # An empty store holds back a delete; a dry run says so too, rather than advise a --delete it would refuse.
        store_empty = not empty_store_ok and not job_store.list(limit=1)[0]
        held_back = delete and store_empty
        deleting = delete and not held_back
        found = 0
        for orphan in find_orphans(job_store, result_storage, older_than * 3600):
            found += 1
            age = (time.time() - orphan.written_at) / 86400
            # The folders on stdout, one a line (for a pipe); what was done, and why not, on stderr.
            if deleting:
                result_storage.delete_prefix(orphan.job_id)
                print(f"{orphan.job_id}\tdeleted, written {age:.1f} days ago", flush=True)
            else:
                print(f"{orphan.job_id}\twritten {age:.1f} days ago", flush=True)
    except (StoreUnavailable, StorageUnavailable) as exc:
        fail(str(exc))
    except OSError as exc:  # a folder it may not delete: one line, not a traceback
        fail(f"{type(exc).__name__}: {exc}")
    finally:
        job_store.close()
    one = found == 1
    folders, belong, them = (f"{found} folder", "belongs", "it") if one else (f"{found} folders", "belong", "them")
    if found == 0:
        console.print(f"no folder older than {older_than:g} h belongs to no job")
    elif store_empty:
        empty = (
            f"{folders} {belong} to no job, and the job store ({redacted(settings.store_url)}) holds no job at all:"
            " is it the one the server uses?"
        )
        lost = "if its jobs were lost (a Redis restarted without its data)"
        if held_back:
            fail(f"{empty} Nothing deleted; add --empty-store-ok {lost}", 2)
        console.print(f"{empty} Delete them with --delete --empty-store-ok {lost}")
    elif not delete:
        console.print(f"{folders} {belong} to no job: run again with --delete to delete {them}")
    else:
        console.print(f"deleted {folders} that belonged to no job")


@app.command()
def bench(
    shape: Annotated[
        str | None,
        typer.Option(help="1.3b-480p (default), 5b-720p, 14b-720p-8layers, 14b-i2v-480p, a14b-720p or tiny"),
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="local diffusers checkpoint, not random weights")] = None,
    presets: Annotated[str, typer.Option(help="presets to compare with plain diffusers")] = "exact,fast,fastest",
    steps: Annotated[
        int | None, typer.Option(min=1, max=200, help="steps of the timed requests (default: model's; tiny 20)")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="timed calls per configuration; the median is reported")] = 5,
    cpu_tiny: Annotated[bool, typer.Option("--cpu-tiny", help="tiny model on the CPU: checks the harness")] = False,
    out: Annotated[Path, typer.Option(help="results directory")] = Path("benchmarks/results"),
    jobs: Annotated[int | None, typer.Option(min=0, help="back-to-back jobs for the serving figure; 0 skips")] = None,
    layers: Annotated[
        int | None, typer.Option(min=1, help="layers of a random-weight transformer (step projected)")
    ] = None,
    cfg_batch: CfgBatchOpt = None,
    text_encoder_cpu: TextCpuOpt = None,
    vae_tiling: TilingOpt = None,
    request: Annotated[
        bool | None, typer.Option("--request/--no-request", help="time whole requests (default: per shape)")
    ] = None,
    cold_start: Annotated[
        bool | None, typer.Option("--cold-start/--no-cold-start", help="time a fresh process to engine ready")
    ] = None,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline/--no-baseline", help="time plain diffusers too (off: the presets alone, no speed-ups)"
        ),
    ] = True,
    time_budget: Annotated[
        float | None,
        typer.Option(help="seconds after which no new phase starts; the report lists what was skipped"),
    ] = None,
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Time plain diffusers and each preset in one process; write benchmarks/results/<device>-<date>.json.

    The file is rewritten after every phase, so a run cut short keeps what it measured. A phase that fails is
    recorded under `errors` and the run goes on; the exit status is then 1."""
    # Torch-free: every option is checked before the harness (torch, the engine) is imported.
    from wanserve.bench.shapes import SHAPES
    from wanserve.request import PRESET_NAMES

    if shape is not None and shape not in SHAPES:
        fail(f"--shape: unknown shape {shape!r}; shapes are {', '.join(SHAPES)}", code=2)
    if cpu_tiny:  # the tiny model on the CPU, whatever else was asked: say so rather than record it
        given = {"--shape": shape not in (None, "tiny"), "--checkpoint": checkpoint, "--layers": layers}
        given["--device"] = device not in (None, "cpu")
        for flag in (flag for flag, value in given.items() if value):
            fail(f"{flag}: does not apply to --cpu-tiny, which runs the tiny model on the CPU", code=2)
    if checkpoint is not None:
        if not (checkpoint / "model_index.json").is_file():
            fail(
                f"--checkpoint: {checkpoint} is not a diffusers checkpoint folder (it has no model_index.json)", code=2
            )
        from wanserve.catalog import local_spec

        try:  # the engine's own reading of a folder, before anything runs: damaged, or not a pipeline it runs
            local_spec(checkpoint)
        except ModelNotFound as exc:
            fail(f"--checkpoint: {exc}", code=2)
    # The shape's layer count is what --layers changes: a checkpoint's and the tiny model's are their own.
    if layers is not None and (checkpoint is not None or shape == "tiny"):
        fail("--layers: applies to the random-weight shapes only, not to --checkpoint or the tiny shape", code=2)
    from wanserve.storage import local_folder_problem

    # The results file is written after the first phase: a folder that cannot hold it is known now.
    if problem := local_folder_problem(out.absolute()):
        fail(f"--out: {out} cannot hold the results file: {problem}", code=2)
    chosen = tuple(p.strip() for p in presets.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PRESET_NAMES]
    if unknown or not chosen:
        what = f"unknown preset(s) {', '.join(map(repr, unknown))}" if unknown else "no preset named"
        fail(f"--presets: {what}; presets are {', '.join(PRESET_NAMES)}", code=2)
    if time_budget is not None and not time_budget > 0:
        fail(f"--time-budget: must be a positive number of seconds, got {time_budget:g}", code=2)
    # The engine settings a bench run gives its engine come from the environment too, as for every command.
    overrides = dict(
        device=device,
        text_encoder_cpu=text_encoder_cpu,
        vae_tiling=vae_tiling,
        cache_dir=cache_dir,
        cfg_batch=cfg_batch,
    )
    settings = settings_from(**overrides)
    # Before anything runs (the run writes its results file at once), as every command checks its settings.
    try:
        if not cpu_tiny:  # which runs on the CPU whatever the device says
            from wanserve.engine.device import check_device

            check_device(settings.device)
        _check_writable(settings.cache_dir, "cache_dir")
    except BadSetting as exc:
        fail_setting(exc, overrides)
    from wanserve.bench import BenchOptions, run_bench, serving_lines, summary_rows, target_lines
    from wanserve.bench.report import ResultsFileError

    options = BenchOptions(
        shape=shape or "1.3b-480p",
        checkpoint=checkpoint,
        presets=chosen,
        steps=steps,
        repeats=repeats,
        baseline=baseline,
        cpu_tiny=cpu_tiny,
        out=out,
        jobs=jobs,
        layers=layers,
        cfg_batch=settings.cfg_batch,
        text_encoder_cpu=settings.text_encoder_cpu,
        vae_tiling=settings.vae_tiling,
        request=request,
        cold_start=cold_start,
        device=settings.device,
        cache_dir=settings.cache_dir,
        time_budget=time_budget,
    )

    def stopped(signum: int, _frame: Any) -> None:  # a time limit's SIGTERM: the run saves where it stopped
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stopped)
    try:
        path, report = run_bench(options)
    except ResultsFileError as exc:
        fail(f"--out: {exc}", code=2)
    except BadSetting as exc:
        fail_setting(exc, overrides)
    except (WanserveError, ValueError) as exc:
        fail(str(exc))
    table = Table(title=f"wanserve bench: {report['run']} ({report['options']['weights']} weights)")
    columns = ("config", "ms/unit", "cached ms", "TFLOP/s", "% ceiling", "speedup", "request s", "skipped", "PSNR dB")
    for column in columns:
        table.add_column(column)
    for row in summary_rows(report):
        table.add_row(*row)
    # Logs and CI are 80 columns wide, which would truncate every cell of this table.
    wide = Console(stderr=True, width=max(console.width, 110))
    wide.print(table)
    for line in serving_lines(report):
        wide.print(escape(line))
    for line in target_lines(report):
        wide.print(f"target {escape(line)}")
    for name, why in report["skipped_phases"].items():
        wide.print(f"[yellow]skipped[/yellow] {name}: {escape(why)}")
    for name, error in report["errors"].items():
        wide.print(f"[red]failed[/red] {name}: {escape(error)}")
    print(path)
    if report["errors"]:
        raise typer.Exit(1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # (httpx2: huggingface_hub 2's client, a line for each request of a download)
    # (botocore.credentials: "Found credentials in environment variables", once for each client made)
    for noisy in ("httpx", "httpx2", "diffusers", "transformers", "huggingface_hub", "botocore.credentials"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
