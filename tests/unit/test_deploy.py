"""Static checks of deploy/: every YAML and JSON file parses, the Helm chart has its probes,
resources, disruption budget, config and secret references, compose mounts files that exist,
Postgres settings are real Postgres 16 settings with durability on, and the dashboard and alert
rules are well formed. (Docker, Helm and promtool are not available here; the metric names the
dashboard and rules use are checked against a live engine in tests/integration/test_metrics.py.)
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest
import yaml

from engine.config import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "txengine"
TEMPLATES = CHART / "templates"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "txengine.json"


def _plain_yaml_files() -> list[pathlib.Path]:
    return sorted(p for p in DEPLOY.rglob("*.y*ml") if TEMPLATES not in p.parents)


def load_yaml(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _plain_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.json")),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


# -- Helm --------------------------------------------------------------------------------------

# Go-template actions that stand on a line of their own (if/with/range/end, include | nindent,
# toYaml | nindent) produce either nothing or an indented block; dropping them and replacing the
# inline ones by a scalar leaves the YAML skeleton of the template, which must parse.
_ACTION_LINE = re.compile(r"^\s*\{\{-?.*-?\}\}\s*$")
_INLINE_ACTION = re.compile(r"\{\{-?.*?-?\}\}")


def render_skeleton(path: pathlib.Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if not _ACTION_LINE.match(line)]
    text = "\n".join(_INLINE_ACTION.sub("TEMPLATED", line) for line in lines)
    return [d for d in yaml.safe_load_all(text) if d]


def chart_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(TEMPLATES.glob("*.yaml")):
        for document in render_skeleton(path):
            objects[document["kind"]] = document
    return objects


def test_chart_metadata():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert (TEMPLATES / "_helpers.tpl").exists() and (TEMPLATES / "NOTES.txt").exists()


def test_chart_templates_have_the_required_objects():
    assert set(chart_objects()) >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
                                    "ServiceMonitor"}


def test_deployment_probes_resources_and_secrets():
    deployment = chart_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(container[probe]["grpc"]) == {"port", "service"}, probe
    assert "resources" in container
    template = (TEMPLATES / "deployment.yaml").read_text()
    assert "{{- toYaml .Values.resources | nindent 12 }}" in template
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one lease holder at a time
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
               if "valueFrom" in e}
    assert set(secrets) == {"TXENGINE_DATABASE_URL", "TXENGINE_REDIS_URL"}
    assert container["envFrom"][0]["configMapRef"]
    assert {p["name"] for p in container["ports"]} == {"grpc", "metrics"}
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_values_resources_probes_and_grace():
    values = load_yaml(CHART / "values.yaml")
    resources = values["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    assert values["replicaCount"] == 1  # a single writer per database
    assert values["probes"]["readiness"]["service"] == "txengine.v1.LedgerService"
    assert values["probes"]["liveness"]["failureThreshold"] * values["probes"]["liveness"][
        "periodSeconds"] >= 60, "a short Postgres outage must not restart the engine"
    grace_seconds = float(values["config"]["TXENGINE_SHUTDOWN_GRACE_SECONDS"])
    drain = values["preStopSleepSeconds"] + grace_seconds
    assert values["terminationGracePeriodSeconds"] > drain


def test_values_config_names_real_settings():
    config = load_yaml(CHART / "values.yaml")["config"]
    fields = set(Settings.model_fields)
    for key, value in config.items():
        assert key.startswith("TXENGINE_") and key.removeprefix("TXENGINE_").lower() in fields, key
        assert isinstance(value, str), f"{key}: ConfigMap values must be quoted strings"


def test_disruption_budget():
    pdb = chart_objects()["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert "minAvailable" in pdb["spec"] or "maxUnavailable" in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] is not None or "selectorLabels" in (
        TEMPLATES / "pdb.yaml").read_text()


def test_service_exposes_grpc_and_metrics():
    ports = {p["name"]: p for p in chart_objects()["Service"]["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    assert ports["grpc"]["appProtocol"] == "grpc"


# -- compose and Docker ------------------------------------------------------------------------

def test_compose_services_and_mounted_files():
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) >= {"postgres", "redis", "engine", "prometheus", "grafana"}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "config_file=/etc/postgresql/postgresql.conf" in services["postgres"]["command"]
    build = services["engine"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in named_volumes:
                continue
            assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    environment = services["engine"]["environment"]
    for key in environment:
        assert key.removeprefix("TXENGINE_").lower() in Settings.model_fields, key


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM ") == 2  # build stage, runtime stage
    assert "HEALTHCHECK" in text and "grpc_health" in text
    assert re.search(r"^EXPOSE 50051 9464$", text, re.MULTILINE)
    assert re.search(r"^USER \d+", text, re.MULTILINE), "the engine must not run as root"
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        assert (ROOT / source).exists(), source


def test_prometheus_scrapes_the_engine_and_loads_the_rules():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "txengine" in jobs and "postgres" in jobs
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]


def test_grafana_provisioning_points_at_the_dashboard():
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "txengine.yml")
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    sources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert sources["datasources"][0]["type"] == "prometheus"


# -- Postgres settings -------------------------------------------------------------------------

def postgres_conf() -> dict[str, str]:
    settings = {}
    for line in (DEPLOY / "postgres" / "postgresql.conf").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip().strip("'")
    return settings


def test_postgres_durability_is_on():
    settings = postgres_conf()
    assert settings["fsync"] == "on"
    assert settings["synchronous_commit"] == "on"
    assert settings["full_page_writes"] == "on"


def test_postgres_settings_exist_in_postgres_16():
    import pgserver

    binary = pathlib.Path(pgserver.__file__).parent / "pginstall" / "bin" / "postgres"
    described = subprocess.run([str(binary), "--describe-config"], capture_output=True,
                               text=True, check=True).stdout
    types = {row.split("\t")[0]: row.split("\t")[3] for row in described.splitlines() if row}
    for key, value in postgres_conf().items():
        if "." in key:  # an extension's setting (pg_stat_statements.track)
            continue
        assert key in types, f"{key} is not a Postgres 16 setting"
        if types[key] == "BOOLEAN":
            assert value in {"on", "off", "true", "false"}, (key, value)


# -- alert rules and dashboard ----------------------------------------------------------------

def rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def test_alert_rules_are_complete():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert _balanced(rule["expr"]), name
    # Required: latency objective burn, queue saturation, commit errors, fencing loss.
    assert {"TxengineCreateTransfersLatencyBudgetFastBurn",
            "TxengineCreateTransfersLatencyBudgetSlowBurn", "TxengineShardQueueSaturated",
            "TxengineCommitFailures", "TxengineFencedOut", "TxengineUnavailable"} <= set(alerts)
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in alerts.values():
        for name in re.findall(r"txengine:[a-z0-9_:]+", rule["expr"]):
            assert name in recorded, name


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values())


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
    for expr in dashboard_exprs():
        assert _balanced(expr), expr
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for topic in ("Requests/s", "Errors/s", "Latency", "Queue depth", "Postgres"):
        assert topic in titles


# -- metric names used by the dashboard and the rules ------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}
# Series that are not the engine's: Prometheus's own `up`, and postgres_exporter's pg_*.
NOT_THE_ENGINES = re.compile(r"^(up|pg_.*)$")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers, ranges and
    strings that are neither functions, keywords, nor grouping labels."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def metric_names_used() -> set[str]:
    """Every series name the dashboard and the alert rules read, minus recording rules."""
    recorded = {r["record"] for r in rules() if "record" in r}
    used = set()
    for expr in dashboard_exprs() + [r["expr"] for r in rules()]:
        used |= metric_names(expr)
    return {name for name in used - recorded if not NOT_THE_ENGINES.match(name)}


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (grpc_method, le) (rate('
            'grpc_server_handling_seconds_bucket{job=~"$job", grpc_code!="OK"}[$__rate_interval])))'
            ' / on (job) max by (job) (txengine_shards) > 2^30 and pg_up == 0')
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "txengine_shards",
                                  "pg_up"}


def test_dashboard_and_rules_read_engine_metrics():
    used = metric_names_used()
    assert {"grpc_server_handled_total", "txengine_shard_queue_items",
            "txengine_stage_seconds_bucket"} <= used
