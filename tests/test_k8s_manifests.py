"""deploy/k8s: the manifests parse, build with kustomize, and agree with each other, with the
Dockerfile and with the app (probe and metrics paths are real routes, the site file is a valid
site), and the example Secret holds placeholders only and stays out of the kustomization."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from cds_service.config import load_sites
from cds_service.ops.listeners import OPS_PATHS
from cds_service.ops.serving import SETTINGS as GUNICORN
from cds_service.records.database import PG_CONNECT_TIMEOUT_S
from cds_service.service import index_services
from hooks import SERVICES
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
SECRET = "examples/secret.example.yaml"
KINDS = {
    "configmap.yaml": ("v1", "ConfigMap"),
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
    "spool-pvc.yaml": ("v1", "PersistentVolumeClaim"),
    "kustomization.yaml": ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    SECRET: ("v1", "Secret"),
}
SECRET_KEYS = {"CDS_DATABASE_URL", "CDS_REPLAY_CACHE_URL", "CDS_JWKS_CACHE_URL"}
PLACEHOLDER = "REPLACE_ME"


def manifest(name: str) -> dict:
    [document] = list(yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")))
    return document


@pytest.fixture(scope="module")
def deployment() -> dict:
    return manifest("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_file_is_one_object_of_its_kind(name):
    document = manifest(name)
    assert (document["apiVersion"], document["kind"]) == KINDS[name]
    if document["kind"] != "Kustomization":
        assert document["metadata"]["name"].startswith("cds-service")


def test_kustomization_lists_every_manifest_but_the_example_secret_and_builds():
    assert {str(p.relative_to(K8S)) for p in K8S.rglob("*") if p.is_file()} == set(KINDS)
    resources = manifest("kustomization.yaml")["resources"]
    # `kubectl apply -k` must never replace the real Secret with the example's REPLACE_ME.
    assert sorted(resources) == sorted(set(KINDS) - {"kustomization.yaml", SECRET})
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (Debian package kubectl) is needed to build the kustomization"
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert sorted(d["kind"] for d in yaml.safe_load_all(built)) == sorted(
        kind for name, (_, kind) in KINDS.items() if name in resources)
    assert "Secret" not in {d["kind"] for d in yaml.safe_load_all(built)}


def test_probe_and_metrics_paths_are_routes_of_the_app(make_app, deployment, container):
    routes = make_app().url_map.bind("localhost")
    probes = {name: container[name]["httpGet"]
              for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    for path in [p["path"] for p in probes.values()] + [annotations["prometheus.io/path"]]:
        routes.match(path, method="GET")  # raises NotFound otherwise
    assert probes["readinessProbe"]["path"] == "/readyz"
    # Liveness must not depend on PostgreSQL: a slow database would restart every pod at once.
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert container["readinessProbe"]["timeoutSeconds"] > PG_CONNECT_TIMEOUT_S
    assert annotations["prometheus.io/scrape"] == "true"
    # /metrics is served on the ops listener only (404 on the public port the Service exposes).
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    command = container["command"]
    assert int(annotations["prometheus.io/port"]) == ports["ops"]
    assert command[command.index("--ops-port") + 1] == str(ports["ops"])
    assert annotations["prometheus.io/path"] in OPS_PATHS
    assert all(p["port"] == "http" for p in probes.values())


def test_selectors_match_the_pod_labels(deployment):
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return selector.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(manifest("service.yaml")["spec"]["selector"])
    assert selects(manifest("pdb.yaml")["spec"]["selector"]["matchLabels"])
    for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"])
    target = manifest("hpa.yaml")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])


def test_service_port_reaches_the_container_port(container):
    [port] = manifest("service.yaml")["spec"]["ports"]
    [container_port] = [p for p in container["ports"] if p["name"] == "http"]
    assert port["port"] == 80
    assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
    assert container_port["containerPort"] == 8000
    command = container["command"]
    assert command[:2] == ["cds-service", "serve"]
    assert command[command.index("--port") + 1] == "8000"
    assert command[command.index("--host") + 1] == "0.0.0.0"  # noqa: S104 - inside the pod


def test_scaling_and_disruption_budget_fit_together():
    hpa, pdb = manifest("hpa.yaml")["spec"], manifest("pdb.yaml")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    [metric] = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] == 60
    # With minAvailable equal to the minimum replicas, no node could ever be drained.
    assert pdb["minAvailable"] == 1 < hpa["minReplicas"]


def test_every_secret_key_is_consumed_and_every_consumed_key_exists(container):
    secret = manifest(SECRET)
    assert set(secret["stringData"]) == SECRET_KEYS
    consumed = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                if "valueFrom" in e}
    assert set(consumed) == SECRET_KEYS
    for name, ref in consumed.items():
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], name)


def test_the_secret_is_an_example_with_placeholders_only():
    text = (K8S / SECRET).read_text(encoding="utf-8")
    assert "EXAMPLE ONLY" in text
    secret = manifest(SECRET)
    assert "data" not in secret  # base64 would hide what is committed
    for name, value in secret["stringData"].items():
        url = urlsplit(value)
        assert url.scheme in ("postgresql", "rediss"), name  # TLS to Redis
        assert url.password == PLACEHOLDER, name
        assert url.hostname.endswith(".example.internal"), name


def test_no_manifest_carries_key_material_or_tokens():
    for path in (p for p in K8S.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8")
        assert "PRIVATE KEY" not in text, path.name
        assert not re.search(r"eyJ[\w-]{10,}\.[\w-]{10,}\.", text), path.name  # a JWT
        assert not re.search(r'"d"\s*:', text), path.name  # a private JWK member


def test_pod_runs_as_the_images_user_on_a_read_only_root(deployment, container):
    pod = deployment["spec"]["template"]["spec"]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = int(re.search(r"useradd[^\n]*--uid (\d+)", dockerfile).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    # Everything the service writes is on a writable emptyDir.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs]
    env = {e["name"]: e.get("value") for e in container["env"]}
    for path in (env["PROMETHEUS_MULTIPROC_DIR"], "/app/var", "/tmp"):  # noqa: S108
        assert any(Path(path).is_relative_to(m) for m in writable), path


def test_shutdown_outlasts_the_pre_stop_sleep_and_gunicorns_graceful_timeout(deployment,
                                                                              container):
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert grace > int(command[1]) + GUNICORN["graceful_timeout"]
    assert GUNICORN["graceful_timeout"] == 30
    rollout = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0


def test_resources_and_image(container):
    assert container["image"] == "cds-service:0.1.0"
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}


def test_the_site_config_map_is_a_valid_site_mounted_where_the_service_reads(tmp_path,
                                                                              container):
    config_map = manifest("configmap.yaml")
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    sites = load_sites(tmp_path, index_services(SERVICES))
    [site] = sites.values()
    assert site.issuers[0].jku and all(u.startswith("https://") for u in site.issuers[0].jku)
    env = {e["name"]: e.get("value") for e in container["env"]}
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "site-config"]
    assert env["CDS_SITE_CONFIG"] == mount["mountPath"] and mount["readOnly"] is True


def test_the_spool_outlives_the_pod(deployment, container):
    """Records spooled during a PostgreSQL outage must survive the pod (an emptyDir does not),
    and be readable by the other pods, which replay a lost pod's segments."""
    env = {e["name"]: e.get("value") for e in container["env"]}
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == env["CDS_SPOOL_DIR"]]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
                if v["name"] == mount["name"]]
    claim = manifest("spool-pvc.yaml")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
