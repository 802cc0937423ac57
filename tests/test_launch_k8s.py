"""launch/k8s/: every manifest valid offline, and consistent with how dtrain stops and resumes.

Built-in kinds are checked strictly against Kubernetes' own schemas (kubernetes-validate ships
them). The Kubeflow `PyTorchJob` has no schema there: its fields are checked here as the training
operator's validation does, and its pod template strictly, as a core `PodTemplate`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from tests.conftest import REPO

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

K8S = REPO / "launch" / "k8s"
K8S_VERSION = "1.37.0"
EXIT_PREEMPTED, EXIT_CONFIG = 75, 2
TEARDOWN_MARGIN_S = 30  # torchrun's teardown after the workers exit (about 5 s here), and then some
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _all_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in _documents(p.name)]


def _kind(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _documents(name) if d["kind"] == kind]
    return doc


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    job = _kind("job.yaml", "Job")
    pytorch = _kind("pytorchjob.yaml", "PyTorchJob")
    return [("job.yaml", job["spec"]["template"]),
            *((f"pytorchjob.yaml:{r}", spec["template"]) for r, spec in pytorch["spec"]["pytorchReplicaSpecs"].items())]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# -- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "doc"), [d for d in _all_documents() if d[1]["kind"] != "PyTorchJob"],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_builtin_kinds_are_valid(name: str, doc: dict[str, Any]) -> None:
    _validate(doc)


@pytest.mark.parametrize(("where", "template"), _pod_templates(), ids=lambda v: v if isinstance(v, str) else "")
def test_pod_templates_are_valid(where: str, template: dict[str, Any]) -> None:
    _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template})


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is an error, not a warning."""
    job = copy.deepcopy(_kind("job.yaml", "Job"))
    job["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job)


# -- the PyTorchJob, as the training operator validates it ---------------------------------------

def pytorchjob_problems(job: dict[str, Any]) -> list[str]:
    """What the Kubeflow training operator (kubeflow.org/v1) would reject or misread."""
    problems = []
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        problems.append("apiVersion/kind must be kubeflow.org/v1 PyTorchJob")
    if not DNS_1035.match(job.get("metadata", {}).get("name", "")):
        problems.append("metadata.name must be a DNS-1035 label")
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "Worker" not in replicas:
        problems.append("spec.pytorchReplicaSpecs needs a Worker")
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            problems.append(f"replica type {rtype} must be Master or Worker")
        containers = rspec.get("template", {}).get("spec", {}).get("containers", [])
        if not any(c.get("name") == "pytorch" for c in containers):
            problems.append(f"{rtype}: the operator needs a container named 'pytorch'")
        if any(not c.get("image") for c in containers):
            problems.append(f"{rtype}: every container needs an image")
        if rspec.get("restartPolicy") not in ("Always", "OnFailure", "Never", "ExitCode"):
            problems.append(f"{rtype}: restartPolicy {rspec.get('restartPolicy')!r} unknown")
        if not isinstance(rspec.get("replicas"), int) or rspec["replicas"] < 1:
            problems.append(f"{rtype}: replicas must be a positive integer")
    if "Master" in replicas and replicas["Master"].get("replicas") != 1:
        problems.append("there must be exactly one Master replica")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        lo, hi = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            problems.append("elasticPolicy needs 1 <= minReplicas <= maxReplicas")
        elif "Worker" in replicas and not lo <= replicas["Worker"].get("replicas", 0) <= hi:
            problems.append("Worker replicas must lie within elasticPolicy's min and max")
        if elastic.get("rdzvBackend", "c10d") not in ("c10d", "etcd", "etcd-v2"):
            problems.append("elasticPolicy.rdzvBackend must be c10d, etcd or etcd-v2")
        if "nProcPerNode" in elastic and "nprocPerNode" in spec:
            problems.append("elasticPolicy.nProcPerNode is deprecated; set only spec.nprocPerNode")
        if "Master" in replicas:
            problems.append("an elastic job has Workers only: every pod runs the same torchrun agent")
    nproc = spec.get("nprocPerNode")
    if nproc is not None and not (isinstance(nproc, str) and (nproc.isdigit() or nproc in ("auto", "cpu", "gpu"))):
        problems.append("spec.nprocPerNode must be a string: a number, auto, cpu or gpu")
    return problems


def test_pytorchjob_passes_the_operators_checks() -> None:
    assert pytorchjob_problems(_kind("pytorchjob.yaml", "PyTorchJob")) == []


def _broken(path: str, value: Any) -> dict[str, Any]:
    job = copy.deepcopy(_kind("pytorchjob.yaml", "PyTorchJob"))
    *parents, last = path.split(".")
    node = job
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return job


@pytest.mark.parametrize(("path", "value", "problem"), [
    ("metadata.name", "Dtrain_Demo", "DNS-1035"),
    ("spec.elasticPolicy.minReplicas", 5, "minReplicas <= maxReplicas"),
    ("spec.elasticPolicy.rdzvBackend", "static", "rdzvBackend"),
    ("spec.pytorchReplicaSpecs.Worker.replicas", 9, "within elasticPolicy"),
    ("spec.pytorchReplicaSpecs.Worker.restartPolicy", "Sometimes", "restartPolicy"),
    ("spec.pytorchReplicaSpecs.Launcher", {"replicas": 1, "restartPolicy": "Never", "template": {"spec": {}}},
     "Master or Worker"),
    ("spec.nprocPerNode", 8, "must be a string"),
    ("spec.pytorchReplicaSpecs.Worker", None, "needs a Worker"),
])
def test_pytorchjob_check_catches(path: str, value: Any, problem: str) -> None:
    assert any(problem in p for p in pytorchjob_problems(_broken(path, value)))


def test_pytorchjob_container_must_be_named_pytorch() -> None:
    job = copy.deepcopy(_kind("pytorchjob.yaml", "PyTorchJob"))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert any("'pytorch'" in p for p in pytorchjob_problems(job))


def test_preempted_pods_are_restarted_not_failed() -> None:
    worker = _kind("pytorchjob.yaml", "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]
    # ExitCode retries only 128-255; 75 would end the job.
    assert worker["restartPolicy"] == "OnFailure"


# -- what dtrain needs from every pod ------------------------------------------------------------

@pytest.mark.parametrize(("where", "template"), _pod_templates(), ids=lambda v: v if isinstance(v, str) else "")
def test_grace_period_covers_the_emergency_snapshot(where: str, template: dict[str, Any]) -> None:
    spec = template["spec"]
    (container,) = spec["containers"]
    shutdown = int(_env(container)["SHUTDOWN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] >= shutdown + TEARDOWN_MARGIN_S


@pytest.mark.parametrize(("where", "template"), _pod_templates(), ids=lambda v: v if isinstance(v, str) else "")
def test_run_dir_is_on_the_claim(where: str, template: dict[str, Any]) -> None:
    spec = template["spec"]
    (container,) = spec["containers"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    run_dir = _env(container)["RUN_DIR"]
    (mount,) = [path for path in mounts if run_dir.startswith(path.rstrip("/") + "/")]
    pvc = _kind("pvc.yaml", "PersistentVolumeClaim")
    assert claims[mounts[mount]] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every node writes its shards there
    assert spec["securityContext"]["runAsUser"] == 1000 and spec["securityContext"]["fsGroup"] == 1000


@pytest.mark.parametrize(("where", "template"), _pod_templates(), ids=lambda v: v if isinstance(v, str) else "")
def test_resources_are_requested(where: str, template: dict[str, Any]) -> None:
    (container,) = template["spec"]["containers"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]


# -- the plain Job: rendezvous through the headless Service, exit codes through podFailurePolicy --

def test_job_rendezvous_reaches_pod_zero() -> None:
    job, service = _kind("job.yaml", "Job"), _kind("job.yaml", "Service")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    env = _env(pod["containers"][0])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"])
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_job_failure_policy_follows_the_exit_codes() -> None:
    spec = _kind("job.yaml", "Job")["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    (container,) = spec["template"]["spec"]["containers"]
    actions = {}
    for rule in spec["podFailurePolicy"]["rules"]:  # the first rule that matches wins
        on_codes = rule.get("onExitCodes")
        if on_codes is None:
            continue
        # A rule naming another container never matches: the exit code would silently count.
        assert on_codes["containerName"] == container["name"] and on_codes["operator"] == "In", rule
        for code in on_codes["values"]:
            actions.setdefault(code, rule["action"])
    assert actions[EXIT_PREEMPTED] == "Ignore"  # a new pod resumes, the backoff limit is untouched
    assert actions[EXIT_CONFIG] == "FailJob"
    assert any(c["type"] == "DisruptionTarget" for r in spec["podFailurePolicy"]["rules"]
               for c in r.get("onPodConditions", []) if r["action"] == "Ignore")
