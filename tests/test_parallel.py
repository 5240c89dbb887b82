"""Every multi-process layout gives what one process gives, and is really on.

Real processes and real collectives: gloo on the CPU, tiny models, float32. One group of 2 and one group of 4
processes each run a list of scenarios once (module fixtures); each test then checks one scenario against
the same request run in this process. `torchrun` itself runs the CLI and the kill -9 test.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wanserve.config import Settings
from wanserve.engine.engine import Engine
from wanserve.engine.parallel import GroupLeader, LayoutError, check_layout, follow
from wanserve.errors import Cancelled
from wanserve.request import GenerationRequest, resolve

from videos import decode_mp4, png_bytes

STEPS = 3
RED = png_bytes((220, 30, 30))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str = "tiny-t2v"
    layout: dict[str, Any] = field(default_factory=dict)  # Settings fields: ulysses, ring, cfg_parallel, fsdp
    size: int = 64  # 64x64x9 frames: 3 x 4 x 4 = 48 tokens; 48x48: 3 x 3 x 3 = 27 tokens
    cancel_at: int | None = None  # rank 0 alone asks to cancel before this step
    generate: bool = False  # run Engine.generate (with no seed) instead of prepare + denoise
    lead: bool = False  # rank 0 drives a GroupLeader through two requests, the others `follow`
    hang_at: int | None = None  # rank 1 stops answering before this step (without dying)
    die_at: int | None = None  # rank 1 is killed (SIGKILL) before this step
    timeout: float = 60.0


GROUP_OF_2 = [
    Scenario("ulysses", layout={"ulysses": 2}),
    Scenario("ring", layout={"ring": 2}),
    Scenario("cfg", layout={"cfg_parallel": 2}),
    Scenario("fsdp", layout={"fsdp": True}),
    Scenario("ulysses-fsdp", layout={"ulysses": 2, "fsdp": True}),
    Scenario("ulysses-moe", model="tiny-t2v-moe", layout={"ulysses": 2}),
    Scenario("ulysses-i2v", model="tiny-i2v", layout={"ulysses": 2}),
    Scenario("ring-ti2v", model="tiny-ti2v", layout={"ring": 2}),
    Scenario("uneven-ulysses", layout={"ulysses": 2}, size=48),
    Scenario("uneven-ring", layout={"ring": 2}, size=48),
    Scenario("agree", layout={"ulysses": 2}, cancel_at=2),
    Scenario("generate", layout={"ulysses": 2}, generate=True),
    Scenario("lead", layout={"ulysses": 2}, lead=True),
]
GROUP_OF_4 = [
    Scenario("ulysses-ring", layout={"ulysses": 2, "ring": 2}),
    Scenario("cfg-ulysses", layout={"ulysses": 2, "cfg_parallel": 2}),
    Scenario("uneven-ulysses-ring", layout={"ulysses": 2, "ring": 2}, size=48),
]


def request_for(scenario: Scenario, seed: int | None = 9) -> GenerationRequest:
    image = RED if scenario.model in ("tiny-i2v", "tiny-ti2v") else None
    size = scenario.size
    return GenerationRequest(
        prompt="a lighthouse", image=image, width=size, height=size, num_inference_steps=STEPS, seed=seed
    )


# ---- what each rank runs ---------------------------------------------------------------------------------


class Observer:
    """Forward hooks that record what this rank's transformers really computed."""

    def __init__(self, engine: Engine) -> None:
        self.tokens: dict[int, list[int]] = {}  # expert -> sequence length entering self-attention
        self.passes = 0
        self.batches: list[int] = []
        self.prompts: list[float] = []  # a checksum of the text embeddings of each pass
        for expert, transformer in enumerate(engine.transformers):
            self.tokens[expert] = []
            for block in transformer.blocks:
                # The attention module's input is after diffusers' split hook at `blocks.0`.
                block.attn1.register_forward_pre_hook(
                    lambda _m, args, expert=expert: self.tokens[expert].append(args[0].shape[1])
                )
            transformer.register_forward_pre_hook(self._pass, with_kwargs=True)

    def _pass(self, _module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        self.passes += 1
        self.batches.append(kwargs["hidden_states"].shape[0])
        self.prompts.append(float(kwargs["encoder_hidden_states"].double().sum()))


def parameter_storage(engine: Engine) -> dict[str, tuple[int, int]]:
    """(elements held by this rank, elements of the whole model) for the sharded modules."""
    from torch.distributed.tensor import DTensor

    modules = {f"transformer{i}": m for i, m in enumerate(engine.transformers)}
    modules["text_encoder"] = engine.pipe.text_encoder
    storage = {}
    for name, module in modules.items():
        params = list(module.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        storage[name] = (local, sum(p.numel() for p in params))
    return storage


def run_scenario(scenario: Scenario, cache: Path, rank: int, out_dir: Path) -> dict[str, Any]:
    settings = Settings(
        cache_dir=cache, device="cpu", dtype="float32", collective_timeout=scenario.timeout, **scenario.layout
    )
    engine = Engine.load(scenario.model, settings)
    observer = Observer(engine)
    result: dict[str, Any] = {"rank": rank}
    if scenario.lead:
        result.update(lead_and_follow(engine, scenario, out_dir))
    elif scenario.generate:
        out = out_dir / f"{scenario.name}-rank{rank}.mp4"
        generated = engine.generate(request_for(scenario, seed=None), out)
        result.update(seed=generated.seed, wrote=out.exists())
    else:
        req = resolve(request_for(scenario), engine.spec)

        def should_cancel(step: list[int] = [0]) -> bool:  # noqa: B006 - a counter kept between calls
            step[0] += 1
            if scenario.hang_at is not None and rank == 1 and step[0] > scenario.hang_at:
                time.sleep(3600)  # a peer stuck without dying: only timeouts can free rank 0
            if scenario.die_at is not None and rank == 1 and step[0] > scenario.die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return rank == 0 and scenario.cancel_at is not None and step[0] > scenario.cancel_at

        try:
            latents, _, _ = engine.denoise(engine.prepare(req), req, lambda _e: None, should_cancel)
            result["latents"] = latents
        except Cancelled as exc:
            result["cancelled_at"] = exc.step
    result.update(
        tokens=observer.tokens,
        passes=observer.passes,
        batches=observer.batches,
        prompts=observer.prompts,
        storage=parameter_storage(engine),
        cfg_rank=engine.parallel.cfg_rank if engine.parallel else 0,
    )
    return result


def lead_and_follow(engine: Engine, scenario: Scenario, out_dir: Path) -> dict[str, Any]:
    """What a worker group does: rank 0 gets jobs (here: two, the second cancelled) and leads."""
    if engine.parallel is not None and not engine.parallel.is_leader:
        follow(engine)  # returns when the leader says stop
        return {"followed": True}
    leader = GroupLeader(engine)
    leader.idle()  # what an idle worker sends while it polls the queue
    first = leader.generate(request_for(scenario, seed=None), out_dir / "lead-1.mp4")
    try:
        leader.generate(request_for(scenario), out_dir / "lead-2.mp4", should_cancel=lambda: True)
        cancelled_at = None
    except Cancelled as exc:
        cancelled_at = exc.step
    leader.stop()
    return {"seed": first.seed, "wrote": first.video_path.exists(), "cancelled_at": cancelled_at}


def rank_main(rank: int, world: int, port: int, cache: Path, scenarios: list[Scenario], out_dir: Path) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # 2 to 4 processes share 2 cores
    logging.basicConfig(
        filename=out_dir / f"rank{rank}.log", level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for scenario in scenarios:
        torch.save(run_scenario(scenario, cache, rank, out_dir), out_dir / f"{scenario.name}-rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    world: int, scenarios: list[Scenario], cache: Path, out_dir: Path, timeout: float, until_rank_0: bool = False
) -> list[int | None]:
    """Run the scenarios on `world` fresh processes; their exit codes (None: still running, then killed).

    Waits for all of them, but stops at the first failure (the others would only wait for it), or, with
    `until_rank_0`, as soon as rank 0 has exited.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spawn = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        spawn.Process(target=rank_main, args=(rank, world, port, cache, scenarios, out_dir)) for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.exitcode for p in procs]
        if until_rank_0:
            if codes[0] is not None:
                break
        elif None not in codes or any(code not in (None, 0) for code in codes):
            break
        time.sleep(0.2)
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return codes


def load_results(scenarios: list[Scenario], world: int, out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {s.name: [torch.load(out_dir / f"{s.name}-rank{r}.pt") for r in range(world)] for s in scenarios}


def logs(out_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out_dir.glob("rank*.log")))


@pytest.fixture(scope="module")
def group_of_2(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("group2")
    codes = launch(2, GROUP_OF_2, tiny_cache, out_dir, timeout=240)
    assert codes == [0, 0], logs(out_dir)
    return load_results(GROUP_OF_2, 2, out_dir)


@pytest.fixture(scope="module")
def group_of_4(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("group4")
    codes = launch(4, GROUP_OF_4, tiny_cache, out_dir, timeout=240)
    assert codes == [0, 0, 0, 0], logs(out_dir)
    return load_results(GROUP_OF_4, 4, out_dir)


class Reference:
    """The same requests in this one process, with the same observers."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.engines: dict[str, Engine] = {}
        self.results: dict[tuple[str, int], dict[str, Any]] = {}

    def engine(self, model: str, **settings: Any) -> Engine:
        key = f"{model}:{sorted(settings.items())}"
        if key not in self.engines:
            self.engines[key] = Engine.load(model, Settings(cache_dir=self.cache, device="cpu", **settings))
        return self.engines[key]

    def __call__(self, scenario: Scenario) -> dict[str, Any]:
        key = (scenario.model, scenario.size)
        if key not in self.results:
            engine = self.engine(scenario.model)
            assert engine.parallel is None and engine.dtype == torch.float32
            observer = Observer(engine)
            req = resolve(request_for(scenario), engine.spec)
            latents, _, _ = engine.denoise(engine.prepare(req), req, lambda _e: None)
            self.results[key] = {"latents": latents, "tokens": observer.tokens[0][0], "passes": observer.passes}
        return self.results[key]


@pytest.fixture(scope="module")
def reference(tiny_cache: Path) -> Reference:
    return Reference(tiny_cache)


def scenario(name: str) -> Scenario:
    return next(s for s in GROUP_OF_2 + GROUP_OF_4 if s.name == name)


def ranks_of(request: pytest.FixtureRequest, name: str, world: int) -> list[dict[str, Any]]:
    return request.getfixturevalue("group_of_2" if world == 2 else "group_of_4")[name]


def assert_same_latents(ranks: list[dict[str, Any]], expected: torch.Tensor) -> None:
    for result in ranks:
        torch.testing.assert_close(result["latents"], expected, rtol=1e-5, atol=1e-5)


# ---- sequence parallelism --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "world"),
    [
        ("ulysses", 2),
        ("ring", 2),
        ("ulysses-moe", 2),
        ("ulysses-i2v", 2),
        ("ring-ti2v", 2),
        ("ulysses-ring", 4),
    ],
)
def test_sequence_parallel_matches_one_process(
    name: str, world: int, request: pytest.FixtureRequest, reference: Reference
) -> None:
    ranks = ranks_of(request, name, world)
    expected = reference(scenario(name))
    assert_same_latents(ranks, expected["latents"])
    full = expected["tokens"]
    for result in ranks:
        # Really split: every pass of every expert saw 1/N of the tokens (both experts for A14B-style).
        for expert, seen in result["tokens"].items():
            assert seen, f"expert {expert} never ran"
            assert set(seen) == {full // world}, (expert, seen, full)
        assert result["passes"] == expected["passes"]  # CFG still runs both passes on every rank
    if name == "ulysses-moe":
        assert all(result["tokens"][1] for result in ranks)


@pytest.mark.parametrize(("name", "world"), [("uneven-ulysses", 2), ("uneven-ring", 2), ("uneven-ulysses-ring", 4)])
def test_token_counts_that_do_not_divide(
    name: str, world: int, request: pytest.FixtureRequest, reference: Reference
) -> None:
    ranks = ranks_of(request, name, world)
    expected = reference(scenario(name))
    full = expected["tokens"]
    assert full == 27 and full % world
    assert_same_latents(ranks, expected["latents"])
    shares = sorted(result["tokens"][0][0] for result in ranks)
    if name == "uneven-ulysses-ring":
        assert shares == [full] * world  # no uneven mode for Ulysses x ring: the request ran unsplit
    else:
        assert shares == [full // 2, full - full // 2]  # uneven shards (diffusers' "anything" modes)


# ---- CFG parallelism and batching -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "world"), [("cfg", 2), ("cfg-ulysses", 4)])
def test_cfg_parallel_matches_one_process(
    name: str, world: int, request: pytest.FixtureRequest, reference: Reference
) -> None:
    ranks = ranks_of(request, name, world)
    expected = reference(scenario(name))
    assert_same_latents(ranks, expected["latents"])
    sequence_degree = world // 2
    for result in ranks:
        assert result["passes"] == STEPS  # one pass per step, not two
        assert set(result["tokens"][0]) == {expected["tokens"] // sequence_degree}
    # The two halves ran different passes (conditional and unconditional embeddings); within a half, the same.
    by_half: dict[int, set[tuple[float, ...]]] = {}
    for result in ranks:
        by_half.setdefault(result["cfg_rank"], set()).add(tuple(result["prompts"]))
    assert sorted(by_half) == [0, 1] and all(len(v) == 1 for v in by_half.values())
    assert by_half[0] != by_half[1]


def test_cfg_batch_matches_two_passes(reference: Reference) -> None:
    base = Scenario("cfg-batch")
    expected = reference(base)
    engine = reference.engine(base.model, cfg_batch=True)
    observer = Observer(engine)
    req = resolve(request_for(base), engine.spec)
    latents, _, _ = engine.denoise(engine.prepare(req), req, lambda _e: None)
    torch.testing.assert_close(latents, expected["latents"], rtol=1e-5, atol=1e-5)
    assert observer.passes == STEPS and set(observer.batches) == {2}


# ---- FSDP ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp", "ulysses-fsdp"])
def test_fsdp_matches_one_process_and_holds_half_the_weights(name: str, group_of_2: dict, reference: Reference) -> None:
    ranks = group_of_2[name]
    assert_same_latents(ranks, reference(scenario(name))["latents"])
    for module in ("transformer0", "text_encoder"):
        held = [result["storage"][module][0] for result in ranks]
        total = ranks[0]["storage"][module][1]
        assert sum(held) == total, (module, held, total)
        assert all(h <= total // 2 + total // 20 for h in held), (module, held, total)  # about 1/2 each
    for result in group_of_2["ulysses"]:  # unsharded for comparison
        assert result["storage"]["transformer0"][0] == result["storage"]["transformer0"][1]


# ---- rank agreement ---------------------------------------------------------------------------------------------


def test_cancel_on_rank_0_stops_every_rank_at_the_same_step(group_of_2: dict) -> None:
    ranks = group_of_2["agree"]
    assert [result.get("cancelled_at") for result in ranks] == [2, 2]
    assert [result["passes"] for result in ranks] == [2 * 2, 2 * 2]  # steps 1 and 2, two passes each


def test_generate_rank_0_writes_the_video_with_one_agreed_seed(group_of_2: dict) -> None:
    leader, follower = group_of_2["generate"]
    assert leader["wrote"] and not follower["wrote"]
    assert leader["seed"] == follower["seed"]  # drawn on rank 0 and broadcast: no seed was given
    assert leader["passes"] == follower["passes"] == 2 * STEPS


def test_leader_and_follower_serve_requests_until_stopped(group_of_2: dict) -> None:
    leader, follower = group_of_2["lead"]
    assert leader["wrote"] and leader["cancelled_at"] == 0
    assert follower["followed"]
    # The follower ran the first request in step with the leader and stopped the second with it, at step 0.
    assert leader["passes"] == follower["passes"] == 2 * STEPS


def test_layout_must_match_the_process_count() -> None:
    with pytest.raises(LayoutError, match=r"ulysses × ring × cfg_parallel = 2 × 2 × 1 = 4 processes.*WORLD_SIZE is 2"):
        check_layout(Settings(ulysses=2, ring=2), world_size=2)
    with pytest.raises(LayoutError, match="torchrun --nproc-per-node 2"):
        check_layout(Settings(cfg_parallel=2), world_size=1)
    check_layout(Settings(ulysses=2, cfg_parallel=2), world_size=4)
    check_layout(Settings(fsdp=True), world_size=3)  # FSDP alone shards over any number of ranks
    with pytest.raises(LayoutError, match="cpu_offload"):
        check_layout(Settings(ulysses=2, cpu_offload=True), world_size=2)
    # Under torchrun with no layout at all, no setting of the user's is blamed.
    with pytest.raises(LayoutError, match=r"^WORLD_SIZE is 4 \(torchrun\), but the layout asks for one") as raised:
        check_layout(Settings(), world_size=4)
    assert raised.value.setting == ""


# ---- the CLI under torchrun, and failures ----------------------------------------------------------------------


def torchrun(args: list[str], cache: Path, **env: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "WANSERVE_CACHE_DIR": str(cache), "COLUMNS": "200", "OMP_NUM_THREADS": "1", **env}
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "wanserve", "generate", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def test_generate_under_torchrun_matches_one_process(tiny_cache: Path, tmp_path: Path, reference: Reference) -> None:
    out = tmp_path / "fox.mp4"
    args = ["--model", "tiny-t2v", "--ulysses", "2", "--prompt", "a red fox", "--seed", "4", "--steps", "3"]
    proc = torchrun([*args, "--out", str(out)], tiny_cache)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    # One run's output, as from one process: rank 1 works but does not report (a script reads one path).
    assert stdout.splitlines() == [str(out)] and stderr.count("step 3/3") == 1 and stderr.count("seed 4 ·") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.mp4", "fox.webp"]

    request = GenerationRequest(prompt="a red fox", seed=4, num_inference_steps=3)
    alone = reference.engine("tiny-t2v").generate(request, tmp_path / "alone" / "fox.mp4")
    ours, theirs = decode_mp4(out).frames.astype(int), decode_mp4(alone.video_path).frames.astype(int)
    assert ours.shape == theirs.shape == (9, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1


def children_of(pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers started by `pid`."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            for item in environ:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = int(entry.name)
    return ranks


def test_kill_9_of_one_rank_ends_the_other_within_the_timeout(tiny_cache: Path, tmp_path: Path) -> None:
    timeout = 10
    args = ["--model", "tiny-t2v", "--ulysses", "2", "--prompt", "x", "--steps", "200", "--size", "128x128"]
    proc = torchrun([*args, "--out", str(tmp_path / "x.mp4")], tiny_cache, WANSERVE_COLLECTIVE_TIMEOUT=str(timeout))
    stepping = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "denoising step 3/200" in line:
                stepping.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert stepping.wait(120), "".join(lines)
        workers = children_of(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)  # our own grandchild, by its pid
        killed = time.monotonic()
        code = proc.wait(timeout + 30)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0
    assert elapsed < timeout + 5, elapsed
    assert not Path(f"/proc/{workers[0]}").exists()  # the surviving rank is gone, not orphaned
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize(
    ("how", "problem"),
    [("hang_at", "collective timed out after 5 s"), ("die_at", "collective failed (")],
    ids=["peer-hangs", "peer-killed"],
)
def test_a_lost_peer_ends_rank_0_on_its_own(how: str, problem: str, tiny_cache: Path, tmp_path: Path) -> None:
    """No supervisor here: rank 1 hangs without dying (nothing closes) or is killed (its sockets close);
    rank 0 must exit with the watchdog's code and line, within the timeout, instead of waiting forever."""
    lost = Scenario("lost", layout={"ulysses": 2}, timeout=5, **{how: 2})
    started = time.monotonic()
    codes = launch(2, [lost], tiny_cache, tmp_path, timeout=90, until_rank_0=True)
    assert codes[0] == 3, (codes, logs(tmp_path))
    assert time.monotonic() - started < 60
    fatal = [line for line in (tmp_path / "rank0.log").read_text().splitlines() if line.startswith("CRITICAL")]
    assert len(fatal) == 1, fatal
    assert fatal[0].startswith(f"CRITICAL wanserve.engine.parallel: FATAL: {problem}"), fatal
    assert "on rank 0 (a peer rank probably died); exiting so the group can be restarted [during " in fatal[0]
    assert not (tmp_path / "lost-rank0.pt").exists()


def test_watchdog_exits_with_a_clear_line(tmp_path: Path) -> None:
    code = (
        "import time\n"
        "from wanserve.engine.parallel import Watchdog\n"
        "with Watchdog(1.0, rank=3).guard('denoising step 7/50'):\n"
        "    time.sleep(60)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert time.monotonic() - started < 30
    assert (
        "FATAL: collective timed out after 1 s on rank 3 (a peer rank probably died); "
        "exiting so the group can be restarted [during denoising step 7/50]"
    ) in done.stderr
