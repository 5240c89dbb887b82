"""A worker marks its pod's deletion cost through the Kubernetes API: busy while it has a job, idle otherwise.

No cluster runs here: the API server is a stand-in that answers HTTPS with a certificate of its own CA, takes
merge patches on pods as the real one does, and records them; the worker is the real one with the tiny model.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trustme

from wanserve.catalog import lookup
from wanserve.config import Settings
from wanserve.engine.engine import Engine
from wanserve.jobs import Job, new_job_id, open_store
from wanserve.kube import ANNOTATION, BUSY_COST, IDLE_COST, PodDeletionCost
from wanserve.request import GenerationRequest, resolve
from wanserve.storage import open_storage
from wanserve.worker import Worker

from service import Process, base_env, free_port, wait_for


class ApiServer:
    """Pods' annotations over HTTPS; `refuse` answers 403 as RBAC does to an account without `patch`."""

    def __init__(self, ca: trustme.CA, refuse: bool = False) -> None:
        self.patches: list[dict[str, Any]] = []
        self.refuse = refuse
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.patches.append(
                    {
                        "path": self.path,
                        "authorization": self.headers["Authorization"],
                        "content_type": self.headers["Content-Type"],
                        "body": json.loads(body),
                    }
                )
                status = 403 if server.refuse else 200
                answer = json.dumps({"kind": "Status" if server.refuse else "Pod"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def costs(self) -> list[str]:
        return [p["body"]["metadata"]["annotations"][ANNOTATION] for p in self.patches]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def api_server(ca: trustme.CA) -> Iterator[ApiServer]:
    server = ApiServer(ca)
    yield server
    server.close()


def service_account(root: Path, ca: trustme.CA, token: str = "token-1") -> Path:
    """What Kubernetes mounts in a pod at /var/run/secrets/kubernetes.io/serviceaccount."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "token").write_text(token)
    (root / "namespace").write_text("wanserve\n")
    ca.cert_pem.write_to_path(str(root / "ca.crt"))
    return root


def test_a_worker_is_costly_to_delete_only_while_it_has_a_job(
    tmp_path: Path, tiny_cache: Path, ca: trustme.CA, api_server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, cache_dir=tiny_cache, lease_seconds=5, poll_interval=0.05)
    store, storage = open_store(settings.store_url), open_storage(settings.storage_url)
    worker = Worker("tiny-t2v", settings, store, storage, engine=Engine.load("tiny-t2v", settings))
    account = service_account(tmp_path / "account", ca)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api_server.port))
    monkeypatch.setenv("POD_NAME", "wanserve-worker-ti2v-5b-7d9f-abcde")
    cost = PodDeletionCost.in_cluster(lambda: worker.busy, account_dir=account, interval=0.05)
    cost.start()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: api_server.costs() == [str(IDLE_COST)], 10, "the idle worker's cost")
        (account / "token").write_text("token-2")  # Kubernetes rotated the projected token
        spec = lookup("tiny-t2v")
        assert spec is not None
        slow = GenerationRequest(prompt="a fox", seed=1, num_inference_steps=150, width=128, height=128, num_frames=17)
        job = store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request=resolve(slow, spec).to_dict()))
        wait_for(lambda: store.get(job.id).status.finished, 120, "the job to finish")
        wait_for(lambda: api_server.costs()[-1] == str(IDLE_COST), 10, "the cost to fall back")
    finally:
        worker.drain(grace=0)
        thread.join(30)
        cost.stop()
        store.close()
    costs = api_server.costs()
    assert costs[0] == costs[-1] == str(IDLE_COST) and str(BUSY_COST) in costs, costs
    assert all(a != b for a, b in pairwise(costs)), costs  # written on change only
    first, *later = api_server.patches
    assert first["path"] == "/api/v1/namespaces/wanserve/pods/wanserve-worker-ti2v-5b-7d9f-abcde"
    assert first["content_type"] == "application/merge-patch+json"
    assert first["authorization"] == "Bearer token-1"
    assert all(p["authorization"] == "Bearer token-2" for p in later)


def test_a_worker_refused_by_rbac_says_what_to_grant_and_stops_asking(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    server = ApiServer(ca, refuse=True)
    busy = threading.Event()
    cost = PodDeletionCost(
        busy.is_set, f"https://127.0.0.1:{server.port}", "wanserve", "w-1", service_account(tmp_path, ca), 0.05
    )
    try:
        cost.start()
        wait_for(lambda: server.patches, 10, "the first patch")
        busy.set()  # a change that would be written, were it allowed
        time.sleep(0.5)  # ten checks
        assert len(server.patches) == 1
    finally:
        cost.stop()
        server.close()
    assert "give the worker's service account `patch` on pods" in caplog.text


def test_the_setting_outside_a_cluster_stops_the_worker_naming_it(tmp_path: Path, tiny_cache: Path) -> None:
    env = base_env(tiny_cache, WANSERVE_DATA_DIR=str(tmp_path / "data"), WANSERVE_POD_DELETION_COST="true")
    env.pop("KUBERNETES_SERVICE_HOST", None)
    worker = Process(["worker", "--model", "tiny-t2v", "--ops-port", str(free_port())], env, tmp_path / "worker.log")
    assert worker.proc is not None
    try:
        assert worker.proc.wait(120) == 2, worker.log()
    finally:
        worker.stop()
    assert "WANSERVE_POD_DELETION_COST: is only for a worker in a Kubernetes pod" in worker.log()
