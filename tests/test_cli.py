"""The `wanserve` command as a user runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from videos import decode_mp4

WANSERVE = [sys.executable, "-m", "wanserve"]


def run(
    args: list[str], cache: Path, unset: tuple[str, ...] = (), timeout: float = 300, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    environment.update({"WANSERVE_CACHE_DIR": str(cache), "COLUMNS": "200", **env})
    return subprocess.run([*WANSERVE, *args], capture_output=True, text=True, env=environment, timeout=timeout, cwd=cwd)


def run_each(
    calls: list[tuple[list[str], dict[str, str]]], cache: Path, timeout: float = 120
) -> list[subprocess.CompletedProcess[str]]:
    """`run` for each (args, env), three at a time, the answers in order: a table of wrong inputs is mostly
    interpreter starts, and one after the other they were half a minute of the suite. Each call gets ports of
    its own, so that no two check the same port at once."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import free_tcp_port

    def one(call: tuple[list[str], dict[str, str]]) -> subprocess.CompletedProcess[str]:
        args, env = call
        ports = {"WANSERVE_PORT": str(free_tcp_port()), "WANSERVE_OPS_PORT": str(free_tcp_port())}
        return run(args, cache, timeout=timeout, **{**ports, **env})

    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(one, calls))


def test_generate_writes_a_playable_mp4_and_shows_steps(tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "fox.mp4"
    done = run(
        ["generate", "--model", "tiny-t2v", "--prompt", "a red fox", "--out", str(out), "--seed", "4"],
        tiny_cache,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert "step 4/4" in done.stderr and "seed 4" in done.stderr
    video = decode_mp4(out)
    assert video.frames.shape == (9, 64, 64, 3)
    assert out.with_suffix(".webp").exists()


def test_generate_with_image_size_frames(tiny_cache: Path, tmp_path: Path) -> None:
    from videos import png_bytes

    image = tmp_path / "in.png"
    image.write_bytes(png_bytes((10, 200, 10)))
    out = tmp_path / "i2v.mp4"
    args = ["generate", "--model", "tiny-i2v", "--prompt", "grass", "--image", str(image), "--out", str(out)]
    done = run([*args, "--size", "96x48", "--frames", "5", "--steps", "2", "--fps", "10"], tiny_cache)
    assert done.returncode == 0, done.stderr
    video = decode_mp4(out)
    assert video.frames.shape == (5, 48, 96, 3) and video.fps == 10
    # transformers' advice to install torchvision (for CLIP's image processor, whose PIL twin the pipeline
    # uses): followed, pip would replace the pinned torch with another build and its CUDA wheels.
    assert "torchvision" not in done.stderr, done.stderr


def test_generate_rejects_bad_input_before_loading(tiny_cache: Path, tmp_path: Path) -> None:
    done = run(
        [
            "generate",
            "--model",
            "tiny-t2v",
            "--prompt",
            "x",
            "--frames",
            "10",
            "--out",
            str(tmp_path / "x.mp4"),
        ],
        tiny_cache,
    )
    assert done.returncode == 2  # a usage error, like every wrong flag
    assert "--frames: must be 4k+1" in done.stderr
    assert "loaded" not in done.stderr


def test_real_model_without_network_fails_fast_naming_the_repo(tiny_cache: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done = run(
        ["generate", "--model", "wan2.1-t2v-1.3b", "--prompt", "a fox", "--out", str(tmp_path / "x.mp4")],
        tiny_cache,
        HF_HOME=str(tmp_path / "hf"),
    )
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in message
    assert "--model /models/wan2.1-t2v-1.3b" in message and "WANSERVE_MODELS_DIR" in message
    assert time.monotonic() - started < 60
    # With a models dir given, the error says where the model was looked for, not to set what is set.
    models = tmp_path / "models"
    models.mkdir()
    args = ["generate", "--model", "wan2.1-t2v-1.3b", "--prompt", "a fox", "--out", str(tmp_path / "x.mp4")]
    done = run([*args, "--models-dir", str(models)], tiny_cache, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    message = " ".join(done.stderr.split())
    assert done.returncode == 1
    assert f"not in the models dir: no model_index.json in {models / 'wan2.1-t2v-1.3b'}" in message
    assert "set WANSERVE_MODELS_DIR" not in message
    # Another model's files under its name: an image-to-video copy served as wan2.1-t2v-1.3b served nothing
    # (the API took text requests the worker then failed, and refused the images the worker needed).
    _copy_of(tiny_cache, "tiny-i2v", models / "wan2.1-t2v-1.3b")
    done = run([*args, "--models-dir", str(models)], tiny_cache, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and "holds another model (i2v, one transformer) than wan2.1-t2v-1.3b (t2v" in message


def test_a_repo_is_downloaded_with_a_progress_bar_and_found_offline_next_time(tiny_cache: Path, tmp_path: Path) -> None:
    """The download path, against a Hub stand-in: the files come with a progress bar, and the next start, offline,
    finds them in the cache (the snapshot is named by the branch it was asked as, not only by its commit)."""
    from hub_standin import hub_serving

    source = _copy_of(tiny_cache, "tiny-t2v", tmp_path / "source")
    args = ["generate", "--model", "someone/tiny-wan", "--prompt", "a fox", "--steps", "1", "--frames", "1"]
    cache = {"HF_HOME": str(tmp_path / "hf")}
    with hub_serving("someone/tiny-wan", source) as endpoint:
        done = run([*args, "--out", str(tmp_path / "a.mp4")], tiny_cache, HF_ENDPOINT=endpoint, **cache)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "downloading someone/tiny-wan" in done.stderr and "Fetching" in done.stderr, done.stderr[-3000:]
    offline = run([*args, "--out", str(tmp_path / "b.mp4")], tiny_cache, HF_HUB_OFFLINE="1", **cache)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "downloading" not in offline.stderr
    assert decode_mp4(tmp_path / "b.mp4").frames.shape[0] == 1


def test_doctor_asks_the_hub_for_a_model_not_on_this_machine(tiny_cache: Path, tmp_path: Path) -> None:
    """doctor said OK ("the first start downloads it") for a model on no disk here, with the Hub unreachable or
    no such repo on it: the start it vouched for then failed."""
    import socket

    from hub_standin import hub_serving

    source = _copy_of(tiny_cache, "tiny-t2v", tmp_path / "source")
    cache = {"HF_HOME": str(tmp_path / "hf")}
    args = ["doctor", "--model", "someone/tiny-wan", "--model", "someone/other"]
    with hub_serving("someone/tiny-wan", source) as endpoint:
        done = run(args, tiny_cache, HF_ENDPOINT=endpoint, **cache)
    said = " ".join(done.stdout.split())
    assert done.returncode == 1, said
    assert "OK model someone/tiny-wan: someone/tiny-wan is not on this machine yet" in said, said
    assert "FIX model someone/other: someone/other is neither" in said, said
    assert "the Hub has no repo of that name" in said, said
    # A gated repo describes itself to all: its files (and auth-check) are for those who accepted its terms.
    with hub_serving("someone/tiny-wan", source, gated=True) as endpoint:
        for token in ({}, {"HF_TOKEN": "hf_not_let_in"}):  # no token: the Hub's 401 names no reason
            done = run(args[:3], tiny_cache, HF_ENDPOINT=endpoint, **cache, **token)
            said = " ".join(done.stdout.split())
            assert done.returncode == 1 and "FIX model someone/tiny-wan" in said, (token, said)
            assert "it is gated on the Hub" in said, (token, said)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused
    done = run(args[:3], tiny_cache, HF_ENDPOINT=f"http://127.0.0.1:{port}", **cache)
    said = " ".join(done.stdout.split())
    assert done.returncode == 1, said
    assert f"the Hugging Face Hub (http://127.0.0.1:{port}) cannot be reached from here" in said, said
    assert "a start would fail" in said, said


def test_a_hub_that_never_answers_neither_hangs_a_start_nor_its_stop(tiny_cache: Path, tmp_path: Path) -> None:
    """A proxy or firewall that takes the connection and never answers: `generate` waited at "downloading"
    without end (the Hub client's calls had no timeout), and `serve`, told to stop meanwhile, waited twice its
    grace for the load before it exited, saying nothing."""
    import socket

    from service import Process, base_env, free_port, wait_for

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections are taken (the backlog), never read or answered
    hub = {"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "HF_HOME": str(tmp_path / "hf")}
    try:
        started = time.monotonic()
        args = ["generate", "--model", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--prompt", "p"]
        done = run([*args, "--out", str(tmp_path / "x.mp4")], tiny_cache, timeout=240, **hub)
        assert done.returncode == 1 and "could not download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in done.stderr
        assert time.monotonic() - started < 150, time.monotonic() - started
        env = base_env(tiny_cache, WANSERVE_DATA_DIR=str(tmp_path / "data"), WANSERVE_SHUTDOWN_GRACE="60", **hub)
        serve = Process(["serve", "--port", str(free_port()), "--model", "wan2.1-t2v-1.3b"], env, tmp_path / "s.log")
        try:
            wait_for(lambda: "downloading" in serve.log(), 60, "the download to start")
            assert serve.proc is not None
            serve.proc.send_signal(2)
            stopped = time.monotonic()
            assert serve.proc.wait(60) is not None and time.monotonic() - stopped < 20, serve.log()
            assert "stopping while wan2.1-t2v-1.3b loads" in serve.log()
        finally:
            serve.stop()
    finally:
        silent.close()


def test_a_prompt_longer_than_the_text_encoder_reads_is_said_to_be_cut(tiny_cache: Path, tmp_path: Path) -> None:
    """The text encoder reads the first WANSERVE_MAX_SEQUENCE_LENGTH tokens and dropped the rest silently: two
    prompts differing past it gave the same video, and nothing said why."""
    prompt = "a red fox running through the snow at dawn, mountains behind"
    args = ["generate", "--prompt", prompt, "--steps", "1", "--frames", "1", "--out", str(tmp_path / "x.mp4")]
    quiet_args = [*args[:-1], str(tmp_path / "quiet.mp4")]
    done, quiet = run_each([(args, {"WANSERVE_MAX_SEQUENCE_LENGTH": "16"}), (quiet_args, {})], tiny_cache, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "the text encoder reads the first 16 (WANSERVE_MAX_SEQUENCE_LENGTH)" in " ".join(done.stderr.split())
    assert quiet.returncode == 0, quiet.stderr  # 512 tokens hold it
    assert "the text encoder reads the first" not in quiet.stderr


def test_unknown_model_lists_the_catalog(tiny_cache: Path, tmp_path: Path) -> None:
    done = run(["generate", "--model", "wan9", "--prompt", "x", "--out", str(tmp_path / "x.mp4")], tiny_cache)
    assert done.returncode == 2 and "--model: unknown model 'wan9'" in done.stderr and "wan2.2-ti2v-5b" in done.stderr


def test_models_and_doctor(tiny_cache: Path) -> None:
    models = run(["models"], tiny_cache)
    assert models.returncode == 0
    for name in (
        "wan2.1-t2v-1.3b",
        "wan2.2-t2v-a14b",
        "ti2v-5B",
        "tiny-t2v-moe",
        "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    ):
        assert name in models.stdout
    # The README's table says what the catalog (and so `wanserve models`) says, in the same words.
    from wanserve.catalog import lookup
    from wanserve.cli import model_guidance

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `wan")]
    assert len(rows) == 7
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        spec = lookup(cells[0].strip("`"))
        assert spec is not None, row
        assert cells[1:] == [
            ", ".join(f"`{alias}`" for alias in spec.aliases),
            spec.task_label,
            spec.repo_id,
            f"{spec.width}x{spec.height}",
            str(spec.num_frames),
            str(spec.fps),
            str(spec.num_inference_steps),
            model_guidance(spec),
            f"{spec.flow_shift:.1f}",
        ], row
        assert model_guidance(spec) in models.stdout
    doctor = run(["doctor"], tiny_cache)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for line in ("python", "torch", "pyav", "model cache"):
        assert f"OK   {line}" in doctor.stdout  # the report on stdout: `wanserve doctor | grep FIX` works
    broken = run(["doctor", "--store", "redis://127.0.0.1:1/0"], tiny_cache)
    assert broken.returncode == 1 and "FIX  redis" in broken.stdout


def test_a_damaged_job_store_is_named_at_start_and_by_doctor(tiny_cache: Path, tmp_path: Path) -> None:
    """A jobs.db that is not a database (a disk fault, a file copied half-way) stopped `serve` with a 100-line
    traceback naming no file, while doctor said the store was fine."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.db").write_bytes(b"not an SQLite file\n" * 1000)
    served, doctor, fresh, folder, in_memory, with_options = run_each(
        [
            (["serve", "--data-dir", str(data)], {}),
            (["doctor", "--data-dir", str(data)], {}),
            (["doctor", "--data-dir", str(tmp_path / "new")], {}),
            # A folder where the file goes was "disk I/O error: move it aside (jobs in it are lost)".
            (["doctor", "--store", f"sqlite:///{data}"], {}),
            # An in-memory database, or options SQLite would take as part of the file's name: settings that
            # passed, then serve stopped on "no such table: jobs" (each thread its own database) or made a file
            # `jobs.db?mode=ro`.
            (["serve", "--store", "sqlite:///:memory:"], {}),
            (["serve", "--store", f"sqlite:///{data}/jobs.db?mode=ro"], {}),
        ],
        tiny_cache,
    )
    message = " ".join(served.stderr.split())
    assert served.returncode == 1, served.stderr[-2000:]
    assert f"the job store {data / 'jobs.db'} is damaged: the file is not an SQLite database" in message
    assert "Traceback" not in served.stderr
    assert doctor.returncode == 1
    assert f"FIX job store: {data / 'jobs.db'}: file is not a database: move it aside" in " ".join(
        doctor.stdout.split()
    )
    assert "OK   job store" in fresh.stdout and "created at the first start" in fresh.stdout
    assert not (tmp_path / "new" / "jobs.db").exists()  # a check creates nothing
    assert folder.returncode == 1 and f"FIX job store: {data} is a folder, not a database file" in " ".join(
        folder.stdout.split()
    )
    for served, says in (
        (in_memory, "an in-memory SQLite database is not shared"),
        (with_options, "a SQLite store takes no options"),
    ):
        assert served.returncode == 2 and says in " ".join(served.stderr.split()), served.stderr[-2000:]


def test_compiled_kernels_are_kept_for_the_next_start(tiny_cache: Path, tmp_path: Path) -> None:
    """`--compile on` (inductor's C++ kernels on the CPU): the first process compiles the transformer blocks into
    <cache dir>/compile; a second one with the same cache dir loads those kernels, compiles nothing new, and
    writes the same video."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)  # the tiny models, a few MB
    args = ["generate", "--model", "tiny-t2v", "--prompt", "a red fox", "--steps", "2", "--seed", "4"]

    def start(out: Path) -> set[Path]:
        unset = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
        done = run([*args, "--compile", "on", "--out", str(out)], cache, unset=unset, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "compile:regional(fullgraph)" in done.stderr
        return {p for p in (cache / "compile").rglob("*") if p.is_file()}

    compiled = start(tmp_path / "first.mp4")
    assert any(p.suffix == ".so" for p in compiled)  # inductor's C++ kernels, built on this machine
    assert start(tmp_path / "second.mp4") == compiled
    assert (tmp_path / "second.mp4").read_bytes() == (tmp_path / "first.mp4").read_bytes()

    refused = run([*args, "--compile", "sometimes", "--out", str(tmp_path / "x.mp4")], cache)
    assert refused.returncode == 2 and "compile" in refused.stdout + refused.stderr


def test_help_names_the_environment_variable_of_every_setting(tmp_path: Path) -> None:
    """Each flag that sets a Settings key says which WANSERVE_ variable sets it too, in the help a user reads:
    in full at 80 columns (a pipe's, a log's), where a table cut them short (`WANSERVE_TEXT_ENCO…`)."""
    from wanserve.config import Settings

    for command in ("serve", "api", "worker", "generate", "doctor"):
        shown = run([command, "--help"], tmp_path, COLUMNS="80")
        assert shown.returncode == 0, shown.stderr
        assert "…" not in shown.stdout and max(len(line) for line in shown.stdout.splitlines()) <= 80
        flags = re.findall(r"^ +--([\w-]+)", shown.stdout, flags=re.M)
        keys = {flag.replace("-", "_") for flag in flags} & set(Settings.model_fields)
        assert keys, command
        said = " ".join(shown.stdout.split())
        for key in keys:
            assert f"[env WANSERVE_{key.upper()}]" in said, (command, key)


def test_a_misspelt_variable_is_named_not_silently_ignored(tmp_path: Path) -> None:
    env = {
        "WANSERVE_DEVIC": "cuda",
        "WANSERVE_S3_ENDPOINT_URL": "http://minio:9000",  # read outside the settings: no warning
        # Kubernetes' service links for Services named wanserve and wanserve-api: not typos. WANSERVE_PORT is
        # one too here, and would have stopped the command as a port that is no number.
        "WANSERVE_SERVICE_HOST": "10.0.0.7",
        "WANSERVE_PORT": "tcp://10.0.0.7:8088",
        "WANSERVE_PORT_8088_TCP_ADDR": "10.0.0.7",
        "WANSERVE_API_SERVICE_HOST": "10.0.0.8",
        "WANSERVE_API_PORT": "tcp://10.0.0.8:80",
    }
    done = run(["generate", "--prompt", "a fox", "--steps", "500"], tmp_path, COLUMNS="300", **env)
    assert done.returncode == 2 and "--steps: must be between" in done.stderr, done.stderr
    assert "WANSERVE_DEVIC is not a wanserve setting; ignored (did you mean WANSERVE_DEVICE?)" in done.stderr
    assert "WANSERVE_PORT=tcp://10.0.0.7:8088 is the Kubernetes service link of the Service wanserve" in done.stderr
    for quiet in ("S3_ENDPOINT", "SERVICE_HOST", "8088_TCP", "WANSERVE_API_PORT"):
        assert quiet not in done.stderr, quiet


def test_a_store_password_is_never_printed(tmp_path: Path, redis_url: str) -> None:
    """`serve` logged the store URL with its password in it, and so did doctor and a wrong-URL error."""
    from service import free_port

    with_password = f"redis://:S3cretPass@127.0.0.1:{free_port()}/0"
    in_the_query = f"redis://127.0.0.1:{free_port()}/0?password=S3cretPass"  # redis-py reads this form too
    # A password with / # ? (base64's): the URL does not parse, and the error printed it whole.
    unparsed = f"redis://:S3cretPass/9q+Xy#w=@127.0.0.1:{free_port()}/0"
    printing = [
        ["doctor", "--store", with_password],
        ["doctor", "--store", in_the_query],
        ["serve", "--store", "bogus://:S3cretPass@host/0"],
        ["doctor", "--store", unparsed],
        ["api", "--store", unparsed],
    ]
    data = {"WANSERVE_DATA_DIR": str(tmp_path / "data")}
    for args, done in zip(printing, run_each([(a, data) for a in printing], tmp_path, timeout=60), strict=True):
        assert "S3cretPass" not in done.stdout + done.stderr and "***" in done.stdout + done.stderr, args
        if unparsed in args:
            assert "must be percent-encoded" in " ".join((done.stdout + done.stderr).split()), args
    # A serve that starts logs where its store is: without the password.
    port, log = free_port(), tmp_path / "serve.log"
    store = redis_url.replace("redis://", "redis://:S3cretPass@")  # a password this Redis does not ask for
    env = {
        **os.environ,
        "WANSERVE_STORE": store,
        "WANSERVE_DATA_DIR": str(tmp_path / "data"),
        "WANSERVE_PORT": str(port),
    }
    env["WANSERVE_CACHE_DIR"] = str(tmp_path / "cache")
    with open(log, "wb") as out:
        proc = subprocess.Popen([*WANSERVE, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "wanserve starting" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait(10)
    text = log.read_text()
    assert "wanserve starting" in text and "S3cretPass" not in text and ":***@127.0.0.1" in text, text[-2000:]
    assert "no API key required" in text  # says so, where an operator looks first


def test_an_api_replica_takes_its_workers_preset_and_layout_as_flags(tiny_cache: Path, tmp_path: Path) -> None:
    """The API checks a request's preset against what the workers can run; `wanserve api` had no flag to say
    what that is (docs said to give it the workers' values), so it accepted requests they then failed."""
    import httpx

    from service import Process, base_env, free_port, wait_ready

    env = base_env(tiny_cache, WANSERVE_DATA_DIR=str(tmp_path / "data"))
    for flags, per_request, refused in (
        (["--preset", "fastest"], ["fastest"], "exact"),  # FP8 workers serve fastest only
        (["--ulysses", "2"], ["exact"], "fast"),  # Ulysses workers run no step cache
    ):
        port = free_port()
        api = Process(["api", "--port", str(port), *flags], env, tmp_path / "api.log")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, api, timeout=60)
            (model,) = httpx.get(f"{url}/v1/models").json()["data"]
            assert model["presets"]["per_request"] == per_request, (flags, model)
            answer = httpx.post(f"{url}/v1/videos", json={"prompt": "p", "preset": refused})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "preset", answer.text
        finally:
            api.stop()


def test_mistakes_are_refused_naming_the_flag_before_anything_loads(tmp_path: Path) -> None:
    """Every wrong input on the command line: exit 2, one line naming the flag (or variable) and the rule, no
    traceback, no file written. None of these loads a model, so each answers in about a second."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    out = str(tmp_path / "fox.mp4")
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["generate", "--prompt", "a fox", "--out", str(tmp_path / "folder")], {}, "--out: "),
        (["generate", "--prompt", "a fox", "--out", str(tmp_path / "fox.webp")], {}, "--out: the thumbnail"),
        # One file with its thumbnail on a case-insensitive disk (macOS): the video overwritten.
        (["generate", "--prompt", "a fox", "--out", str(tmp_path / "fox.WEBP")], {}, "--out: the thumbnail"),
        # An MP4 by another name: nothing opens fox.gif as a video.
        (["generate", "--prompt", "a fox", "--out", str(tmp_path / "fox.gif")], {}, "--out: must end in .mp4"),
        (["generate", "--prompt", "a fox", "--out", str(tmp_path / "fox")], {}, "--out: must end in .mp4"),
        (["generate", "--prompt", "a fox", "--out", out, "--steps", "500"], {}, "--steps: must be between 1 and 200"),
        (["generate", "--prompt", "a fox", "--out", out, "--size", "83x48"], {}, "--size: must be a multiple of 16"),
        (["generate", "--prompt", "a fox", "--out", out, "--size", "[/b]"], {}, "--size: must look like WIDTHxHEIGHT"),
        (["generate", "--prompt", "a fox", "--out", out], {"WANSERVE_DEVICE": "gpu"}, "WANSERVE_DEVICE: must be"),
        (["generate", "--prompt", "a fox", "--out", out, "--preset", "turbo"], {}, "--preset: Input should be"),
        (
            ["generate", "--prompt", "a", "--model", "tiny-i2v", "--image", str(tmp_path / "folder"), "--out", out],
            {},
            "--image: ",
        ),
        (
            ["generate", "--prompt", "a", "--model", "tiny-i2v", "--image", str(tmp_path / "not-an-image.png")],
            {},
            "--image: could not be decoded as an image",
        ),
        # An empty file was "could not be decoded" here and "is empty" from submit.
        (
            ["generate", "--prompt", "a", "--model", "tiny-i2v", "--image", str(tmp_path / "empty.png")],
            {},
            "--image: is empty: send a PNG, JPEG or WebP image",
        ),
        (["bench", "--cpu-tiny", "--repeats", "0"], {}, "--repeats"),
        (["bench", "--cpu-tiny", "--presets", "bogus"], {}, "--presets: unknown preset(s) 'bogus'"),
        (["bench", "--cpu-tiny", "--layers", "3"], {}, "--layers: does not apply to --cpu-tiny"),
        (["bench", "--checkpoint", str(tmp_path / "folder")], {}, "--checkpoint: "),
        (["bench", "--cpu-tiny", "--out", str(tmp_path / "not-an-image.png")], {}, "--out: "),
        (["generate", "--prompt", "a fox", "--out", "/proc/fox.mp4"], {}, "--out: cannot write in the folder /proc"),
        (["generate", "--prompt", "a fox", "--out", out, "--size", "512x512"], {}, "--size: 512x512 is larger than"),
        (["generate", "--prompt", "a fox", "--out", out, "--model", ""], {}, "--model: a model name is empty"),
        (["generate", "--prompt", "a fox", "--out", out], {"WANSERVE_MODEL": "tiny-i2v"}, "--image: tiny-i2v is an"),
        (
            ["generate", "--prompt", "a", "--out", out],
            {"WANSERVE_MODEL": "tiny-t2v,tiny-i2v"},
            "WANSERVE_MODEL: names 2",
        ),
        (["generate", "--prompt", "a fox", "--out", out, "--device", "cuda:99"], {}, "--device: cuda:99 was asked for"),
        (["serve", "--model", "tiny-t2v", "--model", "t2v-1.3B", "--model", "wan2.1-t2v-1.3b"], {}, "--model: 'wan2.1"),
        (["worker", "--model", "tiny-t2v", "--model", "tiny-i2v"], {}, "--model: a worker serves exactly one model"),
        (["serve", "--store", "bogus://x"], {}, "--store: unsupported job store URL 'bogus://x'"),
        (["api"], {"WANSERVE_STORAGE": "ftp://x"}, "WANSERVE_STORAGE: "),
        (["worker"], {"WANSERVE_DEVICE": "cuda:99"}, "WANSERVE_DEVICE: cuda:99 was asked for"),
        # A multi-GPU layout outside torchrun, or with offload; a cache folder that cannot exist (was exit 1,
        # blamed on --out, or a traceback).
        (["generate", "--prompt", "a fox", "--out", out, "--ulysses", "2"], {}, "--ulysses: the layout needs"),
        (
            ["generate", "--prompt", "a fox", "--out", out, "--cpu-offload", "--cfg-parallel", "2"],
            {},
            "--cpu-offload: moves whole models",
        ),
        (["worker"], {"WANSERVE_CFG_PARALLEL": "2"}, "WANSERVE_CFG_PARALLEL: the layout needs"),
        (["serve"], {"WANSERVE_RING": "2"}, "WANSERVE_RING: the layout needs"),
        (
            ["generate", "--prompt", "a fox", "--out", out, "--cache-dir", "/proc/nope"],
            {},
            "--cache-dir: /proc/nope cannot hold the tiny model",
        ),
        (["worker"], {"WANSERVE_CACHE_DIR": "/proc/nope"}, "WANSERVE_CACHE_DIR: /proc/nope cannot hold the tiny"),
        (["serve", "--cache-dir", "/proc/nope"], {}, "--cache-dir: /proc/nope cannot hold the tiny"),
    ]
    calls = [(args, {"WANSERVE_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "300", **env}) for args, env, _ in cases]
    for (args, _, needle), done in zip(cases, run_each(calls, tmp_path / "cache"), strict=True):
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert needle in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
    assert not (tmp_path / "fox.mp4").exists()


def test_doctor_flags_settings_that_would_fail_later(tmp_path: Path) -> None:
    """doctor says FIX for what `serve` or `generate` would trip on: a store URL no backend takes, a device that
    is not there."""
    done = run(["doctor", "--store", "bogus://x"], tmp_path, WANSERVE_DEVICE="cuda:99")
    assert done.returncode == 1
    assert "FIX  job store: unsupported job store URL 'bogus://x'" in done.stdout + done.stderr
    assert "FIX  cuda: WANSERVE_DEVICE=cuda:99" in done.stdout + done.stderr
    from conftest import free_tcp_port

    endpoint = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    aws = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = run(["doctor", "--storage", "s3://videos/prod"], tmp_path, WANSERVE_S3_ENDPOINT_URL=endpoint, **aws)
    assert s3.returncode == 1
    assert f"FIX  storage: s3://videos/prod: {endpoint} does not answer" in s3.stdout + s3.stderr


def test_serve_stops_when_a_model_cannot_be_loaded(tmp_path: Path) -> None:
    """An API that went on taking jobs for a model with no weights would queue work nobody runs: serve exits 1,
    saying which model and how to get it, without a traceback."""
    from conftest import free_tcp_port

    done = run(
        ["serve", "--model", "tiny-t2v", "--model", "wan2.1-t2v-1.3b", "--port", str(free_tcp_port())],
        tmp_path / "cache",
        timeout=120,
        WANSERVE_DATA_DIR=str(tmp_path / "data"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: wan2.1-t2v-1.3b: could not download" in done.stderr and "Traceback" not in done.stderr


def test_a_taken_port_is_named_and_nothing_runs_unseen(tiny_cache: Path, tmp_path: Path) -> None:
    """A worker whose ops port is taken used to run on with no /health, /ready or /drain; serve exited 3, the
    code the docs give a dead peer rank. Both exit 2 naming the port setting, and no job is claimed."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {"WANSERVE_DATA_DIR": str(tmp_path / "data")}
        # (WANSERVE_SHARDED_MODEL, from a ConfigMap every role reads, is the API's: the worker reads past it.)
        sharded = {"WANSERVE_SHARDED_MODEL": "tiny-i2v"}
        worker = run(["worker", "--model", "tiny-t2v", "--ops-port", port], tiny_cache, timeout=120, **env, **sharded)
        serve = run(["serve"], tiny_cache, timeout=120, WANSERVE_PORT=port, **env)
    assert worker.returncode == 2, worker.stderr[-3000:]
    assert f"--ops-port: could not listen on 127.0.0.1:{port}" in worker.stderr
    assert "loaded" not in worker.stderr  # refused before the model load, not after it
    assert serve.returncode == 2, serve.stderr[-3000:]
    assert f"WANSERVE_PORT: could not listen on 127.0.0.1:{port}" in serve.stderr and "Traceback" not in serve.stderr
    assert "loaded" not in serve.stderr  # refused before the models load, not after

    elsewhere = run(["api", "--host", "192.0.2.1"], tiny_cache, timeout=120, **env)  # TEST-NET-1: not ours
    assert elsewhere.returncode == 2 and "--host: 192.0.2.1 is not an address of this machine" in elsewhere.stderr


def test_a_local_model_directory_serves_with_defaults_it_can_run(tiny_cache: Path, tmp_path: Path) -> None:
    """A diffusers folder given as --model is described from its own config files: its tasks, strides and the
    per-side limit of its transformer, and defaults within that limit (832 wide used to be refused here)."""
    import shutil

    (source,) = (tiny_cache / "tiny").glob("tiny-t2v-v*")
    local = tmp_path / "my-wan"
    shutil.copytree(source, local)
    out = tmp_path / "local.mp4"
    args = ["generate", "--model", str(local), "--prompt", "a fox", "--steps", "1", "--frames", "1"]
    done = run([*args, "--out", str(out)], tiny_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert decode_mp4(out).frames.shape == (1, 480, 512, 3)
    refused = run([*args, "--size", "528x64", "--out", str(out)], tiny_cache)
    assert refused.returncode == 2 and "--size: must be at most 512" in refused.stderr


def test_prune_lists_then_deletes_only_files_that_belong_to_no_job(tiny_cache: Path, tmp_path: Path) -> None:
    """Files outlive their job's record only when records are lost (a Redis restarted without its data): the
    command finds them, old enough not to be a submit in flight, and deletes them only when told to."""
    from wanserve.jobs import Job, new_job_id
    from wanserve.jobs.sqlite import SQLiteJobStore
    from wanserve.storage.base import key_for, put_bytes
    from wanserve.storage.local import LocalStorage

    data = tmp_path / "data"
    store, storage = SQLiteJobStore(data / "jobs.db"), LocalStorage(data / "videos")
    kept = store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={})).id
    lost, recent = new_job_id(), new_job_id()
    for job_id in (kept, lost, recent):
        put_bytes(storage, key_for(job_id, "video.mp4"), b"mp4")
    (data / "videos" / "backups").mkdir()  # someone else's folder: never a job's
    two_days_ago = time.time() - 2 * 86400
    for folder in (kept, lost, "backups"):
        for path in [data / "videos" / folder, *(data / "videos" / folder).iterdir()]:
            os.utime(path, (two_days_ago, two_days_ago))
    store.close()

    env = {"WANSERVE_DATA_DIR": str(data)}
    listed = run(["prune"], tiny_cache, **env)
    assert listed.returncode == 0, listed.stderr
    assert lost in listed.stdout and "2.0 days ago" in listed.stdout
    assert kept not in listed.stdout and recent not in listed.stdout and "backups" not in listed.stdout
    assert "1 folder belongs to no job: run again with --delete" in listed.stderr
    assert (data / "videos" / lost).exists()  # listing deletes nothing

    assert run(["prune", "--older-than", "72"], tiny_cache, **env).stderr.startswith("no folder older than 72 h")
    deleted = run(["prune", "--delete"], tiny_cache, **env)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith(f"{lost}\tdeleted") and "deleted 1 folder that" in deleted.stderr
    assert sorted(p.name for p in (data / "videos").iterdir()) == sorted([kept, recent, "backups"])


def test_prune_will_not_empty_the_storage_for_a_store_that_holds_nothing(tiny_cache: Path, tmp_path: Path) -> None:
    """A store named by mistake (another Redis database, an empty file) makes every video look orphaned."""
    from wanserve.jobs.sqlite import SQLiteJobStore
    from wanserve.storage.base import key_for, put_bytes
    from wanserve.storage.local import LocalStorage

    videos = LocalStorage(tmp_path / "videos")
    put_bytes(videos, key_for("video_" + "a" * 32, "video.mp4"), b"mp4")
    old = time.time() - 3 * 86400
    os.utime(tmp_path / "videos" / ("video_" + "a" * 32), (old, old))
    os.utime(tmp_path / "videos" / ("video_" + "a" * 32) / "video.mp4", (old, old))
    env = {"WANSERVE_STORAGE": f"file://{tmp_path / 'videos'}"}

    missing = run(["prune", "--delete", "--store", f"sqlite:///{tmp_path / 'typo.db'}"], tiny_cache, **env)
    assert missing.returncode == 2 and "--store: nothing at" in missing.stderr, missing.stderr
    assert not (tmp_path / "typo.db").exists()

    SQLiteJobStore(tmp_path / "empty.db").close()
    # The dry run said "run again with --delete", which then refused.
    dry = run(["prune", "--store", f"sqlite:///{tmp_path / 'empty.db'}"], tiny_cache, **env)
    assert dry.returncode == 0 and "holds no job at all" in dry.stderr and "--empty-store-ok" in dry.stderr, dry.stderr
    assert "run again with --delete" not in dry.stderr
    args = ["prune", "--delete", "--store", f"sqlite:///{tmp_path / 'empty.db'}"]
    refused = run(args, tiny_cache, **env)
    assert refused.returncode == 2 and "holds no job at all" in refused.stderr, refused.stderr
    assert (tmp_path / "videos" / ("video_" + "a" * 32) / "video.mp4").exists()
    assert run([*args, "--empty-store-ok"], tiny_cache, **env).returncode == 0
    assert not (tmp_path / "videos" / ("video_" + "a" * 32)).exists()


def test_wrong_folders_and_urls_are_named_as_set_and_exit_2(tiny_cache: Path, tmp_path: Path) -> None:
    """A file where a folder goes, an empty folder setting, a URL without its scheme, a device this machine
    lacks: each is a wrong setting, named as the user set it, exit 2. Some were a bare OSError (exit 1), an
    empty one quietly meant the working directory, and bench or doctor named the variable for a flag."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    wrong = [  # run_each gives each its own --port and --ops-port
        (["serve", "--data-dir", str(a_file / "sub")], {}, "--data-dir:"),
        (["api"], {"WANSERVE_DATA_DIR": str(a_file)}, "WANSERVE_DATA_DIR:"),
        (["serve", "--store", f"sqlite:///{a_file}/jobs.db"], {}, "--store:"),
        (["doctor"], {"WANSERVE_CACHE_DIR": ""}, "WANSERVE_CACHE_DIR: is set but empty"),
        (["api"], {"WANSERVE_PUBLIC_URL": "api.example.com"}, "WANSERVE_PUBLIC_URL: must be an http"),
        (["bench", "--device", "cuda", "--out", str(tmp_path / "b1")], {}, "--device: cuda was asked for"),
        (["bench", "--cpu-tiny", "--cache-dir", str(a_file), "--out", str(tmp_path / "b2")], {}, "--cache-dir:"),
        # A results folder that cannot be one: each job used to run in full, then fail to store its video.
        (["serve", "--storage", str(a_file / "videos")], {}, f"--storage: {a_file / 'videos'} cannot"),
        (["api", "--storage", f"file://{a_file}"], {}, f"{a_file} is a file, not a folder"),
        # Infinity passed, then broke the expiry sweeper, the drain and the reaper on their threads.
        (["api"], {"WANSERVE_RESULT_TTL": "inf"}, "WANSERVE_RESULT_TTL: Input should be a finite"),
        (["serve"], {"WANSERVE_LEASE_SECONDS": "1e12"}, "WANSERVE_LEASE_SECONDS: Input should be less"),
        # Empty (an empty secret): each replica and worker had a private SQLite queue of its own.
        (["api"], {"WANSERVE_STORE": ""}, "WANSERVE_STORE: is set but empty"),
        (["worker"], {"WANSERVE_STORAGE": " \n"}, "WANSERVE_STORAGE: is set but empty"),
        (["prune", "--data-dir", str(tmp_path / "none")], {}, "--data-dir: nothing at"),  # not WANSERVE_STORE
        (["api", "--sharded-model", "tiny-i2v"], {}, "--sharded-model: 'tiny-i2v' is not a served"),
    ]
    for (args, _, message), done in zip(wrong, run_each([(a, e) for a, e, _ in wrong], tiny_cache), strict=True):
        assert done.returncode == 2, (args, done.returncode, done.stderr[-2000:])
        assert message in " ".join(done.stderr.split()), (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, args
    assert not (tmp_path / "b2").exists()  # refused before the run wrote its results file

    doctor = run(["doctor", "--data-dir", str(a_file), "--device", "cuda"], tiny_cache)
    said = " ".join(doctor.stdout.split()) + " ".join(doctor.stderr.split())
    assert doctor.returncode == 1
    assert f"{a_file}/jobs.db cannot be created: {a_file} is a file: fix --data-dir" in said  # not "OK"
    assert "--device=cuda, but torch" in said  # as it was set
    storage = run(["doctor", "--storage", str(a_file / "videos")], tiny_cache)
    said = " ".join(storage.stdout.split()) + " ".join(storage.stderr.split())
    assert (
        storage.returncode == 1 and f"cannot hold the videos: {a_file} is a file, not a folder: fix --storage" in said
    )

    hint = run(["doctor"], tiny_cache, WANSERVE_S3_ENDPOINT="http://minio:9000")
    assert "did you mean WANSERVE_S3_ENDPOINT_URL?" in hint.stderr

    # `~` is the home folder in every folder setting (the cache dir's was; the data dir's was a folder named
    # `~` in the working directory); a newline from a secret's file is not part of the name; pydantic-settings
    # reads WANSERVE_port as WANSERVE_PORT, so it is not "ignored".
    home = tmp_path / "home"
    env = {"HOME": str(home), "WANSERVE_DATA_DIR": "~/data\n", "WANSERVE_port": "8099"}
    shown = run(["doctor"], tiny_cache, **env)
    said = " ".join(shown.stdout.split()) + " ".join(shown.stderr.split())
    assert f"{home}/data/videos" in said and "~" not in said, said[-2000:]
    assert "WANSERVE_port is not a wanserve setting" not in said


def _copy_of(tiny_cache: Path, name: str, to: Path) -> Path:
    import shutil

    (source,) = (tiny_cache / "tiny").glob(f"{name}-v*")
    shutil.copytree(source, to)
    return to


def test_a_damaged_or_unsupported_model_folder_is_named_not_a_traceback(tiny_cache: Path, tmp_path: Path) -> None:
    """A malformed model_index.json or config was a JSONDecodeError traceback (or an AttributeError for a JSON
    list), a folder missing a component a diffusers error that named none, and a VACE pipeline was taken and
    crashed inside its first generation."""
    import json

    def broken(name: str, change: Any) -> Path:
        folder = _copy_of(tiny_cache, "tiny-t2v", tmp_path / name)
        change(folder)
        return folder

    index = lambda folder: folder / "model_index.json"  # noqa: E731

    def edit(file: Path, **changes: Any) -> None:
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))

    cases = {
        # Well-formed JSON with a wrong value: a TypeError traceback, or "invalid literal for int()" naming nothing.
        "patch-int": (
            lambda f: edit(f / "transformer" / "config.json", patch_size=2),
            "transformer/config.json: patch_size must be three positive whole numbers, got 2",
        ),
        "stride-word": (
            lambda f: edit(f / "vae" / "config.json", scale_factor_spatial="eight"),
            "vae/config.json: scale_factor_spatial must be a positive whole number, got 'eight'",
        ),
        "boundary-word": (
            lambda f: edit(index(f), boundary_ratio="high"),
            "model_index.json: boundary_ratio must be a number between 0 and 1, got 'high'",
        ),
        # An IndexError deep in the engine, and a 112-line traceback for a weight file cut short by a copy.
        "no-transformer": (
            lambda f: index(f).write_text(
                json.dumps({k: v for k, v in json.loads(index(f).read_text()).items() if k != "transformer"})
            ),
            "model_index.json names no transformer: a Wan pipeline needs each",
        ),
        "cut-short": (
            lambda f: [
                w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
                for w in (f / "text_encoder").glob("*.safetensors")
            ],
            "could not be loaded (SafetensorError",
        ),
        "not-json": (lambda f: index(f).write_text("{bad"), "model_index.json cannot be read as a diffusers config"),
        "a-list": (lambda f: index(f).write_text("[1, 2]"), "model_index.json holds a JSON list"),
        "bad-config": (
            lambda f: (f / "transformer" / "config.json").write_text("{"),
            "transformer/config.json cannot be read",
        ),
        "no-vae": (
            lambda f: __import__("shutil").rmtree(f / "vae"),
            "is incomplete: model_index.json names vae, not in the folder",
        ),
        # Taken for a two-expert model that ran its one expert at every step, ignoring the second's settings.
        "one-expert": (
            lambda f: edit(index(f), boundary_ratio=0.875),
            "model_index.json sets boundary_ratio, which switches to a second expert, but names no transformer_2",
        ),
        "vace": (
            lambda f: index(f).write_text(
                json.dumps({**json.loads(index(f).read_text()), "_class_name": "WanVACEPipeline"})
            ),
            "holds a WanVACEPipeline, which wanserve does not run (it runs WanPipeline and WanImageToVideoPipeline)",
        ),
    }
    calls = [
        (
            ["generate", "--model", str(broken(name, change)), "--prompt", "p", "--out", str(tmp_path / f"{name}.mp4")],
            {},
        )
        for name, (change, _) in cases.items()
    ]
    for (name, (_, message)), done in zip(cases.items(), run_each(calls, tiny_cache, timeout=300), strict=True):
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (name, done.stderr)
    missing = run(["generate", "--model", str(tmp_path / "no-such"), "--prompt", "p"], tiny_cache)
    assert missing.returncode == 2 and "no-such is not a directory" in missing.stderr, missing.stderr
    # `rel/model` looks like a Hub repo id too: a file of that name here was downloaded from the Hub instead.
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "model").write_text("not a model")
    relative = run(["generate", "--model", "rel/model", "--prompt", "p"], tiny_cache, cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert relative.returncode == 2 and "rel/model is not a directory" in relative.stderr, relative.stderr
    typo = run(["generate", "--model", "rel/modle", "--prompt", "p"], tiny_cache, cwd=tmp_path, HF_HUB_OFFLINE="1")
    said = " ".join(typo.stderr.split())
    assert typo.returncode != 0 and f"Nor is there a folder {tmp_path / 'rel' / 'modle'} here" in said, said
    # doctor said "OK models dir" for these, and nothing of the models a start would serve.
    models = tmp_path / "models"
    models.mkdir()
    _copy_of(tiny_cache, "tiny-t2v", models / "wan2.1-t2v-1.3b")
    shutil.move(tmp_path / "no-vae", models / "wan2.2-ti2v-5b")
    args = ["doctor", "--models-dir", str(models), "--model", "wan2.1-t2v-1.3b", "--model", "ti2v-5B"]
    doctor = run([*args, "--model", str(tmp_path / "patch-int")], tiny_cache, HF_HOME=str(tmp_path / "hf"))
    said = " ".join(doctor.stdout.split())
    assert doctor.returncode == 1, said
    assert f"FIX models dir: {models / 'wan2.2-ti2v-5b'} is incomplete: model_index.json names vae" in said
    assert f"OK models dir: {models}: wan2.1-t2v-1.3b" in said
    assert f"OK model wan2.1-t2v-1.3b: {models / 'wan2.1-t2v-1.3b'} (models dir)" in said
    assert f"FIX model ti2v-5B: {models / 'wan2.2-ti2v-5b'} is incomplete" in said
    assert "FIX model /" in said and "patch_size must be three positive whole numbers" in said


def test_a_local_copy_named_after_a_model_keeps_its_defaults(tiny_cache: Path, tmp_path: Path) -> None:
    """A copy of a catalog model in a folder of its name (as `hf download --local-dir /models/<name>` leaves it,
    and as the offline advice says to pass it) was described as a generic Wan 2.1 model: 16 fps for TI2V-5B's
    24, and a default size the model never had. Its folder's name now brings the model's own defaults."""
    local = _copy_of(tiny_cache, "tiny-ti2v", tmp_path / "tiny-ti2v")
    out = tmp_path / "named.mp4"
    args = ["generate", "--model", str(local), "--prompt", "a fox", "--steps", "1", "--frames", "1"]
    done = run([*args, "--out", str(out)], tiny_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert decode_mp4(out).frames.shape == (1, 64, 64, 3)  # tiny-ti2v's default, not 832x480
    other = _copy_of(tiny_cache, "tiny-ti2v", tmp_path / "my-finetune")
    done = run(["generate", "--model", str(other), *args[3:], "--out", str(out)], tiny_cache)
    assert done.returncode == 0 and decode_mp4(out).frames.shape == (1, 480, 832, 3), done.stderr[-3000:]
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "tiny-ti2v").symlink_to(other)  # the name is the link's, not its target's
    done = run(["generate", "--model", str(tmp_path / "links" / "tiny-ti2v"), *args[3:], "--out", str(out)], tiny_cache)
    assert done.returncode == 0 and decode_mp4(out).frames.shape == (1, 64, 64, 3), done.stderr[-3000:]


def test_an_out_that_names_a_folder_or_the_input_image_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    """`--out clips/` wrote a file named `clips`, and `--out cat.mp4` wrote its thumbnail over `--image cat.webp`
    (the image the video is made from, lost)."""
    from videos import png_bytes

    image = tmp_path / "cat.webp"
    image.write_bytes(png_bytes((200, 40, 40)))
    args = ["generate", "--model", "tiny-i2v", "--prompt", "p", "--image", str(image), "--frames", "1", "--steps", "1"]
    for out, message in (
        (tmp_path / "cat.mp4", f"--out: the thumbnail, {image}, would be written over --image {image}"),
        (image, "--out: the thumbnail is written beside the video as cat.webp"),
    ):
        done = run([*args, "--out", str(out)], tiny_cache)
        said = " ".join(done.stderr.split())
        assert done.returncode == 2 and message in said, said
    assert image.read_bytes() == png_bytes((200, 40, 40))
    done = run([*args, "--out", f"{tmp_path / 'clips'}/"], tiny_cache)
    assert done.returncode == 2 and "names a folder: give the MP4's path in it" in done.stderr, done.stderr
    assert not (tmp_path / "clips").exists()


def test_an_empty_out_path_is_refused_naming_the_flag(tiny_cache: Path) -> None:
    for out in ("", "/"):
        done = run(["generate", "--model", "tiny-t2v", "--prompt", "p", "--out", out], tiny_cache)
        assert done.returncode == 2 and "--out:" in done.stderr and "names no file" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        # What was typed, not the '.' an empty path becomes.
        assert ("an empty path" if out == "" else f"'{out}'") in done.stderr, done.stderr


def test_a_repo_the_catalog_does_not_know_is_described_from_its_cached_files(tiny_cache: Path, tmp_path: Path) -> None:
    """A fine-tune on the Hub (an image-to-video one here) was described as Wan 2.1 text-to-video until loaded,
    for good in the API: its image requests were refused, its text ones failed on the worker, naming the HF
    cache's snapshot folder. It is described from the files in the HF cache, under its repo id."""
    import shutil

    import httpx

    from service import Process, base_env, free_port, wait_ready
    from videos import png_bytes

    snapshot = tmp_path / "hf" / "hub" / "models--someorg--tiny-i2v-wan" / "snapshots" / ("0" * 40)
    _copy_of(tiny_cache, "tiny-i2v", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = base_env(tiny_cache, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Process(
        ["serve", "--model", "someorg/tiny-i2v-wan", "--port", str(port), "--data-dir", str(tmp_path / "d")],
        env,
        tmp_path / "serve.log",
    )
    try:
        wait_ready(url, server)
        (model,) = httpx.get(f"{url}/v1/models").json()["data"]
        assert model["id"] == "someorg/tiny-i2v-wan" and model["tasks"] == ["i2v"], model
        text_only = httpx.post(f"{url}/v1/videos", json={"prompt": "p"})
        assert text_only.status_code == 400 and text_only.json()["error"]["param"] == "input_reference"
        created = httpx.post(
            f"{url}/v1/videos",
            data={"prompt": "p", "num_inference_steps": "1", "num_frames": "1"},
            files={"input_reference": ("a.png", png_bytes((1, 2, 3)))},
        )
        assert created.status_code == 200, created.text
        video_id = created.json()["id"]
        for _ in range(600):
            video = httpx.get(f"{url}/v1/videos/{video_id}").json()
            if video["status"] in ("completed", "failed"):
                break
            time.sleep(0.1)
        assert video["status"] == "completed", video
        assert "loaded someorg/tiny-i2v-wan from" in server.log()  # by its repo id, not its cache folder
    finally:
        server.stop()
    # One not in the cache, or whose download was cut short (a component missing), is described with generic
    # defaults until a worker has it (which resumes the download), and the log says so.
    partial = tmp_path / "hf" / "hub" / "models--someorg--partial" / "snapshots" / ("1" * 40)
    shutil.rmtree(_copy_of(tiny_cache, "tiny-t2v", partial) / "vae")
    (partial.parents[1] / "refs").mkdir()
    (partial.parents[1] / "refs" / "main").write_text("1" * 40)
    args = ["api", "--model", "someorg/not-cached", "--model", "someorg/partial", "--port", str(port)]
    api = Process([*args, "--data-dir", str(tmp_path / "e")], env, tmp_path / "api.log")
    try:
        wait_ready(url, api)
        assert "someorg/not-cached is neither a catalog model nor in this machine's Hugging Face cache" in api.log()
        assert "someorg/partial is neither a catalog model nor" in api.log()
    finally:
        api.stop()


def test_a_redis_that_refuses_the_store_url_is_a_wrong_setting(redis_url: str, tiny_cache: Path) -> None:
    """A database number the server does not have: serve started, then its worker died with two tracebacks,
    and doctor advised starting a redis-server that was running."""
    from conftest import free_tcp_port

    wrong = redis_url.rsplit("/", 1)[0] + "/99"
    done = run(["serve", "--port", str(free_tcp_port()), "--store", wrong], tiny_cache, timeout=120)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "--store:" in said and "DB index is out of range" in said, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    doctor = run(["doctor", "--store", wrong], tiny_cache)
    said = " ".join((doctor.stdout + doctor.stderr).split())
    assert "refuses it (DB index is out of range): fix --store" in said and "start redis-server" not in said


def test_a_redis_that_would_refuse_or_lose_jobs_is_said_at_start(tmp_path: Path, tiny_cache: Path) -> None:
    """An ACL user that may read but not run the scripts started fine and answered every submit with a bare
    500; a TLS URL for a Redis without TLS was an outage for ever (each request waiting 5 s for a 503); a
    Redis that evicts keys when full, or keeps no append-only file, was said by doctor alone."""
    import redis as redis_py

    from conftest import free_tcp_port, start_redis, stop_redis
    from service import Process, base_env, wait_ready

    port = free_tcp_port()
    server = start_redis(port, tmp_path / "redis", appendonly=False)
    admin = redis_py.Redis(port=port)
    try:
        admin.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~wanserve:*", "&*", "+@read", "+ping")
        api = ["api", "--port", str(free_tcp_port()), "--data-dir", str(tmp_path / "data")]
        done = run([*api, "--store", f"redis://reader:pw@127.0.0.1:{port}/0"], tiny_cache, timeout=120)
        said = " ".join(done.stderr.split())
        assert done.returncode == 2 and "--store: redis://reader:***@127.0.0.1" in said, said
        assert "Redis refuses it" in said and "no permissions" in said and "Traceback" not in said, said
        # The user docs/operations.md gives (no INFO, which managed services often refuse: not judged) does all.
        from wanserve.jobs import Job, new_job_id
        from wanserve.jobs.redis_store import RedisJobStore

        grants = ["~wanserve:*", "&wanserve:events", "+@read", "+@write", "+@scripting", "+ping", "+time", "+publish"]
        admin.execute_command("ACL", "SETUSER", "documented", "on", ">pw", *grants, "+select")
        store = RedisJobStore(f"redis://documented:pw@127.0.0.1:{port}/1")
        try:
            store.check_settings()
            job = store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={"prompt": "p"}))
            assert store.claim("tiny-t2v", "w/1", 30) == store.get(job.id) and store.complete(job.id, "w/1", {}, 60)
            assert store.ping() and store.counts("tiny-t2v").queued == 0
        finally:
            store.close()
        # doctor says what a start would: OK for that user (INFO refused is not judged), FIX for one without
        # the events channel, which it passed (it asked INFO alone) while the start refused it.
        doctor = run(["doctor", "--store", f"redis://documented:pw@127.0.0.1:{port}/1"], tiny_cache)
        assert "OK   redis: redis://documented:***@" in doctor.stdout, doctor.stdout
        admin.execute_command("ACL", "SETUSER", "unpublished", "on", ">pw", *grants[:1], *grants[2:-1], "+info")
        done = run([*api, "--store", f"redis://unpublished:pw@127.0.0.1:{port}/0"], tiny_cache, timeout=120)
        said = " ".join(done.stderr.split())
        assert done.returncode == 2 and "no permissions to run the 'publish' command on wanserve:events" in said, said
        doctor = run(["doctor", "--store", f"redis://unpublished:pw@127.0.0.1:{port}/0"], tiny_cache)
        said = " ".join(doctor.stdout.split())
        assert doctor.returncode == 1 and "FIX redis: redis://unpublished:***@" in said, said
        assert "no permissions to run the 'publish' command" in said, said
        started = time.monotonic()
        done = run([*api, "--store", f"rediss://127.0.0.1:{port}/0"], tiny_cache, timeout=120)
        said = " ".join(done.stderr.split())
        assert done.returncode == 2 and "the server there speaks Redis without TLS: use redis://" in said, said
        assert time.monotonic() - started < 60
        admin.config_set("maxmemory", "100mb")
        admin.config_set("maxmemory-policy", "allkeys-lru")
        url = f"http://127.0.0.1:{free_tcp_port()}"
        env = base_env(
            tiny_cache, WANSERVE_DATA_DIR=str(tmp_path / "data"), WANSERVE_STORE=f"redis://127.0.0.1:{port}/0"
        )
        process = Process(["api", "--port", url.rsplit(":", 1)[1]], env, tmp_path / "api.log")
        try:
            wait_ready(url, process)
            said = " ".join(process.log().split())
            assert "it evicts keys when full (allkeys-lru), jobs among them" in said, said
            assert "its append-only file is off" in said, said
        finally:
            process.stop()
    finally:
        admin.close()
        stop_redis(server)


def test_prune_says_what_is_wrong_in_one_line(tiny_cache: Path, tmp_path: Path) -> None:
    """An S3 that does not answer or a damaged SQLite file were tracebacks; a typo in a plain-path --storage said
    "nothing to prune" where a file:// one was refused."""
    from wanserve.jobs.sqlite import SQLiteJobStore

    from conftest import free_tcp_port

    SQLiteJobStore(tmp_path / "jobs.db").close()
    store = ["--store", f"sqlite:///{tmp_path / 'jobs.db'}"]
    typo = run(["prune", *store, "--storage", str(tmp_path / "no-such-videos")], tiny_cache)
    assert typo.returncode == 2 and "--storage: nothing at" in typo.stderr, typo.stderr
    aws = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    endpoint = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    s3 = run(["prune", *store, "--storage", "s3://videos/x"], tiny_cache, WANSERVE_S3_ENDPOINT_URL=endpoint, **aws)
    assert s3.returncode == 1 and "the result storage (S3) cannot be reached" in s3.stderr, s3.stderr[-2000:]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "jobs.db").write_bytes(b"garbage" * 1000)
    (tmp_path / "bad" / "videos").mkdir()
    damaged = run(["prune", "--data-dir", str(tmp_path / "bad")], tiny_cache)
    assert damaged.returncode == 1 and "is damaged" in damaged.stderr, damaged.stderr[-2000:]
    for done in (typo, s3, damaged):
        assert "Traceback" not in done.stderr


def test_submit_refuses_what_it_cannot_send_and_servers_that_are_not_wanserve(tiny_cache: Path) -> None:
    """NaN guidance was a JSON-encoding traceback; a URL whose server resets the connection (TLS, Redis) was
    tried again for ever; one whose server answers 200 with a web page was a JSONDecodeError; --out beside
    --no-wait made a folder and wrote nothing."""
    import http.server
    import socket
    import threading

    env = {**os.environ, "WANSERVE_CACHE_DIR": str(tiny_cache), "COLUMNS": "200"}
    for args, said in [
        ([b"--prompt", b"caf\xe9"], "--prompt: must be UTF-8 text"),  # was an httpx traceback
        ([b"--prompt", b"p", b"--negative-prompt", b"\xff"], "--negative-prompt: must be UTF-8 text"),
    ]:
        done = subprocess.run(
            [*WANSERVE, b"submit", *args, b"--url", b"http://127.0.0.1:9"], capture_output=True, env=env
        )
        stderr = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and said in stderr and "Traceback" not in stderr, stderr[-2000:]
    key = run(["submit", "--prompt", "p", "--url", "http://127.0.0.1:9"], tiny_cache, WANSERVE_API_KEY="clé-secrète")
    assert key.returncode == 2 and "WANSERVE_API_KEY: holds a character that is not printable ASCII" in key.stderr
    assert "secr" not in key.stderr  # a key is never shown

    nan = run(["submit", "--prompt", "p", "--guidance", "nan", "--url", "http://127.0.0.1:9"], tiny_cache)
    assert nan.returncode == 2 and "--guidance: must be a finite number, got nan" in nan.stderr, nan.stderr
    both = run(["submit", "--prompt", "p", "--no-wait", "--out", "x.mp4", "--url", "http://127.0.0.1:9"], tiny_cache)
    assert both.returncode == 2 and "--out: nothing is downloaded with --no-wait" in both.stderr, both.stderr

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.recv(1024)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()

    class Page(http.server.BaseHTTPRequestHandler):
        def _page(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(404 if self.path.startswith("/prefix/") else 200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", "15")
            self.end_headers()
            self.wfile.write(b"<html>hi</html>")

        do_GET = do_POST = _page

        def log_message(self, *_args: object) -> None:
            pass

    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        reset = run(["submit", "--prompt", "p", "--url", f"http://127.0.0.1:{listener.getsockname()[1]}"], tiny_cache)
        assert reset.returncode == 1 and "is `wanserve serve` running there?" in reset.stderr, reset.stderr
        assert time.monotonic() - started < 60
        other = run(["submit", "--prompt", "p", "--url", f"http://127.0.0.1:{page.server_address[1]}"], tiny_cache)
        said = " ".join(other.stderr.split())
        assert other.returncode == 1 and "is not a wanserve API: POST /v1/videos answered 200 with text/html" in said
        # A URL with a path (a server that is not there): "the server refused the job: 404 Not Found".
        prefixed = f"http://127.0.0.1:{page.server_address[1]}/prefix"
        under = run(["submit", "--prompt", "p", "--no-wait", "--url", prefixed], tiny_cache)
        said = " ".join(under.stderr.split())
        assert under.returncode == 1 and "is not a wanserve API: POST /prefix/v1/videos answered 404" in said, said
        for done in (nan, both, reset, other, under):
            assert "Traceback" not in done.stderr
    finally:
        listener.close()
        page.shutdown()


def test_a_store_on_a_redis_unix_socket_runs_jobs(tmp_path: Path, tiny_cache: Path) -> None:
    """`unix:///path/redis.sock`, a documented store URL, refused every command (a 500 for each create, a
    worker that died at start), while /ready said the store was fine."""
    import httpx

    from conftest import free_tcp_port, redis_server_binary
    from service import Process, base_env, wait_for, wait_ready

    sock = tmp_path / "redis.sock"
    args = [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(tmp_path)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 15, "the Redis socket")
        port = free_tcp_port()
        url = f"http://127.0.0.1:{port}"
        store = ["--store", f"unix://{sock}", "--data-dir", str(tmp_path / "data")]
        serve = Process(["serve", "--port", str(port), *store], base_env(tiny_cache), tmp_path / "serve.log")
        try:
            wait_ready(url, serve)
            created = httpx.post(f"{url}/v1/videos", json={"prompt": "a red fox", "seed": 1}, timeout=30)
            assert created.status_code == 200, created.text
            video_id = created.json()["id"]

            def done() -> bool:
                status = httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()["status"]
                assert status != "failed", serve.log()
                return status == "completed"

            wait_for(done, 120, "the job to complete")
            (tmp_path / "fox.mp4").write_bytes(httpx.get(f"{url}/v1/videos/{video_id}/content", timeout=30).content)
            assert decode_mp4(tmp_path / "fox.mp4").frames.shape[0] == 9
        finally:
            serve.stop()
        assert "Traceback" not in serve.log()
    finally:
        server.terminate()
        server.wait(10)


def test_a_redis_store_url_redis_would_misread_is_a_wrong_setting(tiny_cache: Path) -> None:
    """redis-py reads a database that is not a number as database 0 (fleets on /staging and /prod shared one
    queue), and no host as localhost; a port that is not a number was a 'start redis-server' hint in doctor."""
    wrong = [
        ("redis://127.0.0.1:6390/staging", "the database must be a number (such as /0), got 'staging'"),
        ("redis://:6390/0", "names no host"),
        ("unix:///", "names no socket"),
        ("unix:///tmp/redis.sock?db=x", "the database must be a number"),
        ("redis://127.0.0.1:abc/0", "is not a URL"),
    ]
    calls = [(args, {}) for url, _ in wrong for args in (["api", "--store", url], ["doctor", "--store", url])]
    answers = iter(run_each(calls, tiny_cache, timeout=60))
    for (url, said), done, doctor in zip(wrong, answers, answers, strict=False):
        text = " ".join(done.stderr.split())
        assert done.returncode == 2 and "--store:" in text and said in text, (url, done.stderr[-2000:])
        text = " ".join((doctor.stdout + doctor.stderr).split())
        assert said in text and "start redis-server" not in text, (url, text[-2000:])


def test_generate_refuses_before_loading_and_reports_outside_torchrun(tiny_cache: Path, tmp_path: Path) -> None:
    """A prompt byte that is not UTF-8 was a tokenizer traceback after the model had loaded (minutes for a real
    one); a refused request still made its --out folders; an empty WORLD_SIZE was a traceback; RANK set by a
    pod, outside any torchrun group, silenced the only process (no seed, no path)."""
    out = tmp_path / "a" / "b" / "x.mp4"
    for args, said in [
        (["--prompt", b"caf\xe9"], "--prompt: must be UTF-8 text"),
        (["--prompt", "x", "--negative-prompt", b"caf\xe9"], "--negative-prompt: must be UTF-8 text"),
        (["--prompt", "x", "--frames", "10"], "--frames: "),
    ]:
        command = [*WANSERVE, "generate", *args, "--out", str(out)]
        env = {**os.environ, "WANSERVE_CACHE_DIR": str(tiny_cache), "COLUMNS": "200"}
        done = subprocess.run(command, capture_output=True, env=env, timeout=300)
        stderr = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and said in " ".join(stderr.split()), (args, stderr[-2000:])
        assert "loaded" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "a").exists()
    done = run(["generate", "--prompt", "x", "--out", str(out)], tiny_cache, WORLD_SIZE="")
    assert done.returncode == 2 and "WORLD_SIZE: must be a number of processes" in done.stderr, done.stderr[-2000:]
    alone = tmp_path / "rank.mp4"
    done = run(["generate", "--prompt", "x", "--steps", "1", "--out", str(alone)], tiny_cache, RANK="1")
    assert done.returncode == 0 and done.stdout.strip() == str(alone) and "seed " in done.stderr, done.stderr


def test_serve_says_when_queued_jobs_wait_for_a_model_it_does_not_serve(tmp_path: Path, tiny_cache: Path) -> None:
    """Jobs queued, then `serve` restarted with other models: they waited for ever, and nothing said so."""
    from wanserve.jobs.model import Job, new_job_id
    from wanserve.jobs.sqlite import SQLiteJobStore

    from conftest import free_tcp_port
    from service import Process, base_env, wait_for, wait_ready

    store = SQLiteJobStore(tmp_path / "data" / "jobs.db")
    for _ in range(2):
        store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={"prompt": "a fox"}))
    # The job a `serve` killed mid-run left in progress: it is requeued only once its lease runs out, after the
    # start-up check, which did not count it.
    store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={"prompt": "a fox"}, priority=1))
    interrupted = store.claim("tiny-t2v", "killed-serve/1", 2)
    assert interrupted is not None
    store.close()
    port = free_tcp_port()
    args = ["serve", "--model", "tiny-i2v", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    serve = Process(args, base_env(tiny_cache, WANSERVE_LEASE_SECONDS="3"), tmp_path / "serve.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}", serve)
        said = "2 queued job(s) are for tiny-t2v, which this server does not serve"
        wait_for(lambda: said in serve.log(), 30, "the warning")
        requeued = f"job {interrupted.id} lost its worker on attempt 1 of 3: now queued"
        wait_for(lambda: requeued in serve.log(), 30, "the interrupted job to be requeued")
        wait_for(lambda: "1 queued job(s) are for tiny-t2v, which this server" in serve.log(), 10, "its warning")
    finally:
        serve.stop()


def test_doctor_says_whether_the_redis_keeps_the_jobs(redis_url: str, tiny_cache: Path, tmp_path: Path) -> None:
    """docs/operations.md asks the queue's Redis for an append-only file and no eviction; doctor said "OK" of
    one that would lose every job at its next restart, or evict them when full."""
    import redis

    from conftest import free_tcp_port, start_redis, stop_redis

    def said(url: str) -> tuple[int, str]:
        done = run(["doctor", "--store", url], tiny_cache, COLUMNS="300")
        return done.returncode, " ".join((done.stdout + done.stderr).split())

    code, text = said(redis_url)  # the tests' own Redis: no append-only file
    assert code == 1 and "FIX redis jobs: its append-only file is off" in text, text[-2000:]
    port = free_tcp_port()
    server = start_redis(port, tmp_path / "aof", appendonly=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        assert "OK redis jobs: kept across a restart" in said(url)[1]
        client = redis.Redis.from_url(url)
        client.config_set("maxmemory", "64mb")
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.close()
        code, text = said(url)
        assert code == 1 and "it evicts keys when full (allkeys-lru)" in text, text[-2000:]
    finally:
        stop_redis(server)
