"""deploy/kubernetes: valid Kubernetes objects that start wanserve the way its own CLI and settings take it.

No cluster runs here, so each manifest is checked against what it relies on: the Kubernetes API schema
(kubernetes-validate, offline), the CLI (its arguments parsed by the real Typer commands), the settings (the
ConfigMap loaded by the real `Settings`), the routes its probes and KEDA's trigger call (answered by the
real apps), and the references between objects (Service selectors, named ports, Secret keys).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from wanserve.config import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests are meant for; newer ones accept them too


# The fields of KEDA's objects that these manifests may use (https://keda.sh/docs/2.10/concepts/ and the
# metrics-api scaler's page), with their types: a misspelt or mistyped field is ignored by KEDA, not refused.
_SCALE_DOWN = {"stabilizationWindowSeconds": int, "policies": [{"type": str, "value": int, "periodSeconds": int}]}
KEDA_FIELDS: dict[str, Any] = {
    "ScaledObject": {
        "apiVersion": str,
        "kind": str,
        "metadata": {"name": str},
        "spec": {
            "scaleTargetRef": {"name": str},
            "minReplicaCount": int,
            "maxReplicaCount": int,
            "pollingInterval": int,
            "cooldownPeriod": int,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": _SCALE_DOWN}}},
            "triggers": [
                {
                    "type": str,
                    "metadata": {
                        "url": str,
                        "valueLocation": str,
                        "targetValue": str,
                        "activationTargetValue": str,
                        "authMode": str,
                        "keyParamName": str,
                    },
                    "authenticationRef": {"name": str},
                }
            ],
        },
    },
    "TriggerAuthentication": {
        "apiVersion": str,
        "kind": str,
        "metadata": {"name": str},
        "spec": {"secretTargetRef": [{"parameter": str, "name": str, "key": str}]},
    },
}


def check_fields(value: Any, allowed: Any, where: str) -> None:
    if isinstance(allowed, dict):
        assert isinstance(value, dict), f"{where}: a mapping expected"
        unknown = set(value) - set(allowed)
        assert not unknown, f"{where}: {sorted(unknown)} are not fields here"
        for key, item in value.items():
            check_fields(item, allowed[key], f"{where}.{key}")
    elif isinstance(allowed, list):
        assert isinstance(value, list), f"{where}: a list expected"
        for i, item in enumerate(value):
            check_fields(item, allowed[0], f"{where}[{i}]")
    else:
        assert type(value) is allowed, f"{where}: {allowed.__name__} expected, got {value!r}"


def objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        found += [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]
    return found


def find(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = find(kind, name)
    return found


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in find("Deployment") + find("StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def wanserve_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, c) for w, c in containers() if c["image"] == "wanserve"]


def config() -> dict[str, str]:
    return one("ConfigMap", "wanserve-config")["data"]


def environment(container: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees of the ConfigMap and its own `env` (the Secret's keys stand in)."""
    env = dict(config())
    env.update({e["name"]: e.get("value", f"<{e['name']} from the pod>") for e in container.get("env", [])})
    env["WANSERVE_API_KEY"] = "sk-from-the-secret"
    return env


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_manifest_is_listed_and_every_object_fits_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    seen = set()
    for obj in objects():
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"{key} is defined twice"
        seen.add(key)
        if obj["apiVersion"].startswith("keda.sh/"):
            check_fields(obj, KEDA_FIELDS[obj["kind"]], obj["kind"])  # a CRD, not in the Kubernetes schema
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises, naming the field


def test_every_wanserve_container_runs_a_real_command_with_real_flags() -> None:
    import typer

    from wanserve.catalog import lookup
    from wanserve.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    roles = set()
    for workload, container in wanserve_containers():
        role, *rest = container["args"]
        command = commands.get(role)
        assert command is not None, f"{workload['metadata']['name']}: no command {role!r}"
        command.make_context(role, list(rest))  # raises on an unknown flag or a bad value, as the CLI would
        roles.add(role)
        if role == "worker":
            assert lookup(flag(rest, "--model")) is not None
    assert roles == {"api", "worker"}
    image = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["images"]
    assert [i["name"] for i in image] == ["wanserve"]
    dockerfile = (DEPLOY.parents[1] / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["wanserve"]' in dockerfile


def test_the_configuration_is_read_by_the_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt key would be ignored with a warning and a bad value would stop every pod: both fail here."""
    from wanserve.jobs import check_store_url
    from wanserve.storage import check_storage_url

    fields = {f"WANSERVE_{name.upper()}" for name in Settings.model_fields}
    for workload, container in wanserve_containers():
        env = environment(container)
        unknown = {k for k in env if k.startswith("WANSERVE_")} - fields
        assert not unknown, f"{workload['metadata']['name']}: {unknown} are no settings"
        for key in [k for k in os.environ if k.startswith("WANSERVE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert check_store_url(settings.store or "") == "redis"
        check_storage_url(settings.storage or "")
        assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False
    api = one("Deployment", "wanserve-api")["spec"]["template"]["spec"]["containers"][0]
    served = environment(api)["WANSERVE_MODEL"].split(",")
    for deployment in find("Deployment"):
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "worker":
            assert flag(args, "--model") in served, "the API must accept the jobs this worker takes"
    redis_service = urlsplit(config()["WANSERVE_STORE"]).hostname
    assert redis_service in {s["metadata"]["name"] for s in find("Service")}


def test_services_select_pods_and_probes_call_real_routes_on_named_ports(tmp_path: Path) -> None:
    from wanserve.roles import ops_app

    with _api_app(tmp_path) as app:
        api_routes = set(app.openapi()["paths"])
    worker_routes = {getattr(r, "path", None) for r in ops_app(None, None, None).routes}
    for workload, container in containers():
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe"):
            get = container.get(probe, {}).get("httpGet")
            if get is None:
                continue
            assert get["port"] in ports, f"{workload['metadata']['name']}: {probe} port"
            role = container["args"][0]
            assert get["path"] in (api_routes if role == "api" else worker_routes)
            # /ready is "no" while a model loads or the store is down: as liveness it would restart a worker
            # in the middle of loading, or every replica during a Redis restart.
            assert get["path"] == {"livenessProbe": "/health", "readinessProbe": "/ready"}[probe]
            if probe == "readinessProbe":
                # /ready pings the store and (the API) the bucket, up to 2 s each: Kubernetes' default 1 s
                # timeout read a slow bucket as every replica not ready at once.
                assert container[probe].get("timeoutSeconds", 1) >= 5, f"{workload['metadata']['name']}: {probe}"
            own_port = "--port" if role == "api" else "--ops-port"
            assert int(flag(container["args"], own_port)) == ports[get["port"]]
        if container["args"][0] == "api":  # behind a Service: kept answering while the endpoints catch up
            assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    pods = [w["spec"]["template"] for w in find("Deployment") + find("StatefulSet")]
    for service in find("Service"):
        selector = service["spec"]["selector"]
        matching = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        assert matching, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            names = {p["name"] for pod in matching for c in pod["spec"]["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in names


def test_a_worker_is_given_time_to_finish_or_hand_back_its_job() -> None:
    grace = float(config()["WANSERVE_SHUTDOWN_GRACE"])
    for deployment in find("Deployment"):
        if deployment["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker":
            pod = deployment["spec"]["template"]["spec"]
            # The grace, plus about 10 s for a last write to a restarting Redis (docs/operations.md, "Drain").
            assert pod["terminationGracePeriodSeconds"] >= grace + 15
            (limits,) = [c["resources"]["limits"] for c in pod["containers"]]
            assert limits["nvidia.com/gpu"] == 1


def test_disruption_budgets_select_pods_and_leave_one_to_evict() -> None:
    for budget in find("PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        (workload,) = [
            w for w in find("Deployment") if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        # minAvailable equal to the replicas would block every node drain.
        assert budget["spec"]["minAvailable"] < workload["spec"]["replicas"]


def test_network_policies_admit_the_ports_of_the_pods_they_select() -> None:
    pods = [w["spec"]["template"] for w in find("Deployment") + find("StatefulSet")]
    for policy in find("NetworkPolicy"):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        selected = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        assert selected, f"NetworkPolicy {policy['metadata']['name']} selects no pod"
        open_ports = {c["containerPort"] for p in selected for c0 in p["spec"]["containers"] for c in c0["ports"]}
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= open_ports


def test_what_a_container_writes_lies_on_a_volume() -> None:
    """Caches on the shared volume (or every new worker downloads and compiles again), and /tmp writable where
    the root file system is read-only (uploads are spooled there)."""
    for workload, container in wanserve_containers():
        pod = workload["spec"]["template"]["spec"]
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert {m["name"] for m in container.get("volumeMounts", [])} <= set(volumes)

        def on_a_volume(path: str, mounts: list[str] = mounts) -> bool:
            return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)

        if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
            assert on_a_volume(environment(container).get("TMPDIR", "/tmp"))
        if container["args"][0] == "worker":
            env = environment(container)
            for key in ("WANSERVE_CACHE_DIR", "HF_HOME"):
                assert on_a_volume(env[key]), key
                (mount,) = [m for m in container["volumeMounts"] if env[key].startswith(m["mountPath"])]
                assert "persistentVolumeClaim" in volumes[mount["name"]], f"{key} must outlive the pod"


def test_no_wanserve_container_may_gain_privileges() -> None:
    """The worker ran with the runtime's default capabilities and could gain more (setuid binaries): a GPU needs
    neither, its device plugin mounts the device in."""
    for workload, container in wanserve_containers():
        context = container.get("securityContext", {})
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where


@contextmanager
def _api_app(folder: Path, api_key: str | None = None) -> Iterator[Any]:
    from wanserve.api.app import create_app
    from wanserve.catalog import lookup
    from wanserve.jobs.sqlite import SQLiteJobStore
    from wanserve.storage.local import LocalStorage

    names = ["wan2.2-ti2v-5b"]
    specs = {name: lookup(name) for name in names}
    settings = Settings(data_dir=folder, model=names, api_key=api_key)
    store = SQLiteJobStore(folder / "jobs.db")
    try:
        yield create_app(settings, store, LocalStorage(folder / "videos"), specs)
    finally:
        store.close()


def test_kedas_trigger_reads_the_demand_of_the_workers_model_from_the_api(tmp_path: Path) -> None:
    """KEDA's metrics-api scaler: GET the url (with the key as the header named), read `valueLocation` out of
    the JSON, run ceil(value / targetValue) workers. Done here against the real API with jobs in the store."""
    from fastapi.testclient import TestClient

    from wanserve.jobs.model import Job, new_job_id

    (scaled,) = find("ScaledObject")
    target = one("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    model = flag(target["spec"]["template"]["spec"]["containers"][0]["args"], "--model")
    assert scaled["spec"]["minReplicaCount"] == 0  # down to zero
    # A replica count in the Deployment would undo KEDA's at every `kubectl apply`, stopping busy workers.
    assert "replicas" not in target["spec"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    url = urlsplit(meta["url"])
    service = one("Service", url.hostname.split(".")[0])
    namespace = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["namespace"]
    assert url.hostname == f"{service['metadata']['name']}.{namespace}.svc"  # KEDA runs in another namespace
    assert (url.port or 80) == service["spec"]["ports"][0]["port"]
    assert url.path == f"/v1/models/{model}"
    auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (secret_ref,) = auth["spec"]["secretTargetRef"]
    assert secret_ref["parameter"] == "apiKey" and meta["authMode"] == "apiKey"
    # Not WANSERVE_API_KEY: that holds two keys while a new one rolls out, and KEDA would send both as one.
    assert secret_ref["name"] == "wanserve-secrets" and secret_ref["key"] == "SCALER_API_KEY"
    guide = (DEPLOY.parents[1] / "docs" / "deploy.md").read_text()
    assert f"--from-literal={secret_ref['key']}=" in guide  # the guide's Secret has it

    # Mid-rollout; SCALER_API_KEY holds the one that stays.
    with _api_app(tmp_path, api_key="sk-old,sk-keda") as app, TestClient(app) as client:
        store = app.state.store
        for i in range(3):
            store.enqueue(Job(id=new_job_id(), model=model, request={"prompt": f"p{i}"}))
        assert store.claim(model, "worker-1", 30.0) is not None
        assert client.get(url.path).status_code == 401  # so the key must be sent, as configured
        answer = client.get(url.path, headers={meta["keyParamName"]: "sk-keda"})
        assert answer.status_code == 200, answer.text
        value: Any = answer.json()
        for part in meta["valueLocation"].split("."):
            value = value[part]
    assert value == 3  # two queued and one running: three workers, one per job
    assert float(meta["targetValue"]) == 1 and float(meta["activationTargetValue"]) == 0


def test_the_guide_names_files_that_exist_and_a_worker_group_that_would_start() -> None:
    import typer

    from wanserve.cli import app

    guide = (DEPLOY.parents[1] / "docs" / "deploy.md").read_text()
    for name in re.findall(r"deploy/kubernetes/([\w.-]+\.yaml)", guide):
        assert (DEPLOY / name).exists(), name
    # The torchrun container it shows: torchrun as the command (the image's entrypoint is wanserve), a stop
    # timeout between the drain's grace and the pod's, and a worker command line wanserve takes.
    (snippet,) = re.findall(r"```yaml\n(.*?)```", guide, re.S)
    group = yaml.safe_load(snippet)
    assert group["command"] == ["torchrun"]
    args = group["args"]
    timeout = float(flag(args, "--shutdown-timeout"))
    pod = one("Deployment", "wanserve-worker-ti2v-5b")["spec"]["template"]["spec"]
    assert float(config()["WANSERVE_SHUTDOWN_GRACE"]) < timeout < pod["terminationGracePeriodSeconds"]
    role, *rest = args[args.index("wanserve") + 1 :]
    typer.main.get_command(app).commands[role].make_context(role, rest)  # type: ignore[attr-defined]


def test_a_worker_may_set_its_pods_deletion_cost_and_nothing_more() -> None:
    """Scale-down stops idle workers first only if each worker can annotate its own pod: it is told to, knows
    its pod's name, and its service account is granted `patch` on pods, and no more."""
    for workload in find("Deployment") + find("StatefulSet"):
        spec = workload["spec"]["template"]["spec"]
        container = spec["containers"][0]
        if container.get("args", [""])[0] != "worker":
            assert spec["automountServiceAccountToken"] is False, "only workers talk to the API server"
            assert spec.get("serviceAccountName") in (None, "default"), "only workers talk to the API server"
            continue
        env = {e["name"]: e for e in container["env"]}
        assert spec.get("automountServiceAccountToken", True)
        assert env["WANSERVE_POD_DELETION_COST"]["value"] == "true"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        account = spec["serviceAccountName"]
        one("ServiceAccount", account)
        (binding,) = [b for b in find("RoleBinding") if {"kind": "ServiceAccount", "name": account} in b["subjects"]]
        role = one(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]


def test_the_redis_probe_says_not_ready_for_an_error_reply(tmp_path: Path) -> None:
    """`redis-cli ping` exits 0 on an error reply (LOADING while the append-only file loads after a restart,
    NOAUTH): as a readiness probe it could never fail while the process ran."""
    import subprocess

    from conftest import free_tcp_port, redis_server_binary
    from service import wait_for

    (container,) = (c for _, c in containers() if c["name"] == "redis")
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    for password, ready in (("", True), ("secret", False)):
        port = free_tcp_port()
        args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
        server = subprocess.Popen([*args, *(["--requirepass", password] if password else [])])
        try:
            cli = f"redis-cli -p {port}"  # the pod's is the default port, 6379
            wait_for(lambda: subprocess.run([*cli.split(), "ping"], capture_output=True).stdout, 15, "an answer")  # noqa: B023
            probe = subprocess.run(["sh", "-c", command[2].replace("redis-cli", cli)], capture_output=True)
            assert (probe.returncode == 0) is ready, (password, probe)
        finally:
            server.terminate()
            server.wait(10)
