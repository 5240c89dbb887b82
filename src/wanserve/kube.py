"""Tell Kubernetes which worker pod to remove first when it scales workers down: an idle one.

KEDA lowers a Deployment's replica count when the queue shrinks, and the ReplicaSet then picks pods to delete
by its own rules, blind to which of them is halfway through a video: a busy worker drained at scale-down
hands its job back, and the job starts over on the worker that was kept, idle. The ReplicaSet deletes pods
with the lowest `controller.kubernetes.io/pod-deletion-cost` first, so a worker sets that annotation on its
own pod, higher while it has a job, through the API server with its service account (the manifests in
deploy/kubernetes grant it `patch` on pods in its namespace, nothing more).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from wanserve.errors import BadSetting

log = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
BUSY_COST, IDLE_COST = 100, 0
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# How often the worker's state is compared with what was last written; the ReplicaSet acts on the next
# scale-down, which KEDA and the HPA decide on a scale of tens of seconds.
CHECK_INTERVAL_S = 2.0


class PodDeletionCost:
    """Keeps this pod's deletion cost at BUSY_COST while `busy()` and IDLE_COST otherwise, on a daemon thread."""

    def __init__(
        self,
        busy: Callable[[], bool],
        api_url: str,
        namespace: str,
        pod: str,
        account_dir: Path = SERVICE_ACCOUNT_DIR,
        interval: float = CHECK_INTERVAL_S,
    ) -> None:
        self.busy, self.interval = busy, interval
        self.url = f"{api_url}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.pod = f"{namespace}/{pod}"
        self._token_path = account_dir / "token"
        self._client = httpx.Client(verify=ssl.create_default_context(cafile=account_dir / "ca.crt"), timeout=5.0)
        self._written: int | None = None
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-deletion-cost", daemon=True)

    @classmethod
    def in_cluster(
        cls, busy: Callable[[], bool], account_dir: Path = SERVICE_ACCOUNT_DIR, interval: float = CHECK_INTERVAL_S
    ) -> PodDeletionCost:
        """From what Kubernetes gives a pod: the API server's address in the environment, and the service
        account's token, CA and namespace under `account_dir`. The pod's name is `POD_NAME` (set it from the
        downward API, as deploy/kubernetes does), else the host name, which a Deployment's pod shares."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise BadSetting(
                "is only for a worker in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set)", "pod_deletion_cost"
            )
        missing = [name for name in ("token", "ca.crt", "namespace") if not (account_dir / name).is_file()]
        if missing:
            raise BadSetting(
                f"needs the pod's service account token, and {account_dir} has no {', '.join(missing)} "
                "(is automountServiceAccountToken false?)",
                "pod_deletion_cost",
            )
        host = f"[{host}]" if ":" in host else host  # an IPv6 cluster
        namespace = (account_dir / "namespace").read_text().strip()
        pod = os.environ.get("POD_NAME") or socket.gethostname()
        return cls(busy, f"https://{host}:{port}", namespace, pod, account_dir, interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._client.close()

    def _run(self) -> None:
        while True:
            cost = BUSY_COST if self.busy() else IDLE_COST
            if cost != self._written and not self._write(cost):
                return
            if self._stop.wait(self.interval):
                return

    def _failed(self, why: str) -> None:
        # Once a streak: tried again every check, a restarting API server would fill the log otherwise.
        if not self._failing:
            log.warning("pod %s: could not set its deletion cost (tried again until it works): %s", self.pod, why)
        self._failing = True

    def _write(self, cost: int) -> bool:
        """Set the annotation; False when this will never work (the API server refuses this service account)."""
        patch = {"metadata": {"annotations": {ANNOTATION: str(cost)}}}
        try:
            # Read each time: Kubernetes rotates a projected token well before it expires.
            token = self._token_path.read_text().strip()
            response = self._client.patch(
                self.url,
                json=patch,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
            )
        except (OSError, httpx.HTTPError) as exc:  # the API server restarting: tried again at the next check
            self._failed(str(exc))
            return True
        if response.status_code in (401, 403):
            log.error(
                "pod %s: the API server refuses to set its deletion cost (%d): give the worker's service account "
                "`patch` on pods (deploy/kubernetes/worker.yaml), or unset WANSERVE_POD_DELETION_COST; "
                "scale-down may now stop a busy worker",
                self.pod,
                response.status_code,
            )
            return False
        if response.is_error:
            self._failed(f"the API server answered {response.status_code}")
            return True
        self._written, self._failing = cost, False
        log.info("pod %s: deletion cost %d (%s)", self.pod, cost, "busy" if cost == BUSY_COST else "idle")
        return True
