"""The container deployment, checked by structure: no Docker engine is needed.

docker-compose.yml, deploy/Dockerfile, deploy/prometheus.yml and deploy/alerts.yml
must agree with the ports in services.common.settings.DEFAULT_PORTS and with the
configuration names the services read.
"""

from __future__ import annotations

import graphlib
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.common.settings import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
ALERTS_FILE = ROOT / "deploy" / "alerts.yml"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = sorted(DEFAULT_PORTS)
GATEWAY_UPSTREAMS = {
    "SHOPSTACK_CATALOG_URL": "catalog",
    "SHOPSTACK_PAYMENT_URL": "payment",
    "SHOPSTACK_STATS_URL": "stats",
}
SECRETS = ("SHOPSTACK_JWT_SECRET", "SHOPSTACK_PSP_WEBHOOK_SECRET", "SHOPSTACK_ADMIN_PASSWORD")
PSP_CALLBACK_PATH = "/api/v1/payments/callbacks/psp"
HTTP_REQUESTS = "shopstack_http_requests_total"
HTTP_DURATION_BUCKETS = "shopstack_http_request_duration_seconds_bucket"
HTTP_METRICS = {HTTP_REQUESTS, HTTP_DURATION_BUCKETS, "up"}


def service_metric_names() -> set[str]:
    """Every metric the services define (as exposed), plus Prometheus' own `up`."""
    import importlib

    from prometheus_client import REGISTRY

    for module in ("catalog", "payment", "stats"):
        importlib.import_module(f"services.{module}.metrics")
    importlib.import_module("services.common.metrics")
    names = {"up"}
    for metric in REGISTRY.collect():
        names.add(metric.name)
        names.update(sample.name for sample in metric.samples)
        if metric.type == "counter":
            names.add(metric.name + "_total")
        if metric.type == "histogram":
            names.update(metric.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
_URL = re.compile(r"https?://[^\s'\"]+")


# --- helpers -------------------------------------------------------------------------


@cache
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def interpolate(value: str) -> str:
    """Resolve compose variables to their defaults, as on a machine with none set.

    A required variable (`${VAR:?...}`) fails the test: the demo must start with
    no configuration at all.
    """

    def default(match: re.Match[str]) -> str:
        op = match["op"] or ""
        assert "?" not in op, f"{match[0]} makes the demo stack refuse to start unconfigured"
        return match["arg"] if op else ""

    return _VARIABLE.sub(default, value)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    spec: dict[str, Any] = services[name]
    return spec


def environment(name: str) -> dict[str, str]:
    raw = service(name).get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: interpolate(str(value)) for key, value in raw.items()}


def depends_on(name: str) -> dict[str, str]:
    """The service's dependencies mapped to the condition compose waits for."""
    raw = service(name).get("depends_on", {})
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {dep: (spec or {}).get("condition", "service_started") for dep, spec in raw.items()}


def published_ports(name: str) -> set[tuple[int, int]]:
    """(host port, container port) pairs the service publishes on the host."""
    pairs = set()
    for entry in service(name).get("ports", []):
        if isinstance(entry, dict):
            pairs.add((int(entry["published"]), int(entry["target"])))
            continue
        parts = interpolate(str(entry)).split("/")[0].split(":")
        container = int(parts[-1])
        host = int(parts[-2]) if len(parts) > 1 else container
        pairs.add((host, container))
    return pairs


def host_and_port(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def assert_points_at(url: str, target: str, *, path: str = "") -> None:
    assert host_and_port(url) == (target, DEFAULT_PORTS[target]), url
    assert urlsplit(url).scheme == "http", url
    assert urlsplit(url).path.rstrip("/") == path, url


def healthcheck_command(name: str) -> list[str]:
    check = service(name).get("healthcheck")
    assert check, f"{name} has no healthcheck"
    for field in ("interval", "timeout", "retries"):
        assert field in check, f"{name}'s healthcheck does not set {field}"
    test: list[str] = check["test"]
    assert isinstance(test, list), f"{name}'s healthcheck should be exec form"
    assert test[0] == "CMD", f"{name}'s healthcheck should be exec form"
    return test[1:]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined, comments dropped."""
    instructions = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def instruction_arguments(keyword: str, stage: list[tuple[str, str]]) -> list[str]:
    return [arguments for found, arguments in stage if found == keyword]


def exec_form(keyword: str) -> list[str]:
    found = instruction_arguments(keyword, final_stage())
    assert found, f"the runtime stage has no {keyword}"
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{keyword} should use the exec (JSON array) form"
    return value


def scrape_targets() -> dict[str, tuple[str, str]]:
    """host:port -> (job, metrics path) for every static target."""
    targets = {}
    for job in load_yaml(PROMETHEUS_FILE)["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for group in job.get("static_configs", []):
            for target in group["targets"]:
                targets[target] = (job["job_name"], path)
    return targets


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS_FILE)["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_using(metric: str) -> dict[str, Any]:
    rules = [rule for rule in alert_rules() if metric in metric_names(rule["expr"])]
    assert rules, f"no alert rule uses {metric}"
    return rules[0]


def compact(expression: str) -> str:
    return "".join(expression.split())


def metric_names(expression: str) -> set[str]:
    """Identifiers in a PromQL expression that are series names, not functions or labels."""
    without_selectors = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expression)
    without_groupings = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", without_selectors)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_groupings))
    functions = set(re.findall(r"([a-zA-Z_]+)\s*\(", without_groupings))
    return names - functions - {"and", "or", "unless", "bool", "on", "ignoring"}


# --- the compose file ----------------------------------------------------------------


def test_every_service_is_in_compose() -> None:
    assert set(DEFAULT_PORTS) <= set(compose()["services"])


def test_compose_needs_no_configuration() -> None:
    # interpolate() fails on any required variable.
    for name in compose()["services"]:
        environment(name)
        published_ports(name)


@pytest.mark.parametrize("name", [*APP_SERVICES, "migrate"])
def test_service_is_built_from_the_shared_dockerfile(name: str) -> None:
    build = service(name)["build"]
    assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert service(name)["image"] == service("gateway")["image"], "one image for every service"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_runs_itself(name: str) -> None:
    assert "entrypoint" not in service(name), "the image's ENTRYPOINT is `shopstack`"
    assert service(name)["command"] == ["serve", name]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_listens_on_its_default_port_on_all_interfaces(name: str) -> None:
    env = environment(name)
    assert env.get("SHOPSTACK_PORT", str(DEFAULT_PORTS[name])) == str(DEFAULT_PORTS[name])
    assert env.get("SHOPSTACK_HOST") == "0.0.0.0"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_healthcheck_probes_its_own_readyz(name: str) -> None:
    command = healthcheck_command(name)
    assert command[:2] == ["python", "-c"], "the slim image has python but no curl"
    compile(command[2], f"<{name} healthcheck>", "exec")
    (url,) = _URL.findall(command[2])
    assert host_and_port(url) == ("127.0.0.1", DEFAULT_PORTS[name])
    assert urlsplit(url).path == "/readyz"
    assert "start_period" in service(name)["healthcheck"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_uses_the_compose_postgres_and_redis(name: str) -> None:
    env = environment(name)
    postgres = environment("postgres")
    database = urlsplit(env["SHOPSTACK_DATABASE_URL"])
    assert database.scheme in {"postgresql", "postgres"}
    assert (database.hostname, database.port or 5432) == ("postgres", 5432)
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path == f"/{postgres['POSTGRES_DB']}"
    cache_url = urlsplit(env["SHOPSTACK_REDIS_URL"])
    assert cache_url.scheme == "redis"
    assert (cache_url.hostname, cache_url.port or 6379) == ("redis", 6379)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_waits_for_migrations_and_datastores(name: str) -> None:
    dependencies = depends_on(name)
    assert dependencies.get("migrate") == "service_completed_successfully"
    assert dependencies.get("postgres") == "service_healthy"
    assert dependencies.get("redis") == "service_healthy"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_passes_secrets_through_with_dev_mode_by_default(name: str) -> None:
    env = environment(name)
    assert env["SHOPSTACK_ENV"] == "dev"
    for secret in SECRETS:
        # `${VAR:-}`: unset on the host means empty, i.e. the dev default in dev mode
        # and a start-up error in prod; nothing is hard-coded here.
        assert env.get(secret) == "", f"{name}: {secret} should be passed through, empty"


@pytest.mark.parametrize("name", [n for n in APP_SERVICES if n != "gateway"])
def test_internal_service_is_exposed_not_published(name: str) -> None:
    assert not published_ports(name)
    assert str(DEFAULT_PORTS[name]) in {str(port) for port in service(name).get("expose", [])}


def test_only_the_gateway_and_prometheus_are_published() -> None:
    publishing = {name for name in compose()["services"] if published_ports(name)}
    assert publishing == {"gateway", "prometheus"}
    assert published_ports("gateway") == {(DEFAULT_PORTS["gateway"], DEFAULT_PORTS["gateway"])}
    assert published_ports("prometheus") == {(9090, 9090)}


@pytest.mark.parametrize(("variable", "upstream"), sorted(GATEWAY_UPSTREAMS.items()))
def test_gateway_reaches_its_upstreams(variable: str, upstream: str) -> None:
    assert_points_at(environment("gateway")[variable], upstream)
    assert depends_on("gateway").get(upstream) == "service_healthy"


def test_payment_and_psp_sandbox_reach_each_other() -> None:
    assert_points_at(environment("payment")["SHOPSTACK_PSP_URL"], "psp_sandbox")
    assert_points_at(environment("payment")["SHOPSTACK_CATALOG_URL"], "catalog")
    callback = environment("psp_sandbox")["SHOPSTACK_PSP_CALLBACK_URL"]
    assert_points_at(callback, "payment", path=PSP_CALLBACK_PATH)


@pytest.mark.parametrize(("name", "probe"), [("postgres", "pg_isready"), ("redis", "redis-cli")])
def test_datastore_has_a_healthcheck_and_a_named_volume(name: str, probe: str) -> None:
    assert healthcheck_command(name)[0] == probe
    volumes = service(name)["volumes"]
    named = {str(volume).split(":")[0] for volume in volumes}
    assert named & set(compose()["volumes"]), f"{name} should keep its data in a named volume"


def test_redis_persists_with_an_append_only_file() -> None:
    command = service("redis")["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert words[words.index("--appendonly") + 1] == "yes"


def test_migrate_runs_once_before_everything() -> None:
    migrate = service("migrate")
    assert migrate["entrypoint"] == ["sh", "-c"]
    (script,) = migrate["command"]
    assert script.index("shopstack migrate") < script.index("shopstack seed")
    assert str(migrate["restart"]) == "no"
    assert depends_on("migrate") == {"postgres": "service_healthy", "redis": "service_healthy"}
    assert (
        environment("migrate")["SHOPSTACK_DATABASE_URL"]
        == environment("gateway")["SHOPSTACK_DATABASE_URL"]
    )


def test_dependencies_exist_have_healthchecks_and_form_no_cycle() -> None:
    services = compose()["services"]
    graph = {name: set(depends_on(name)) for name in services}
    for name in services:
        for dependency, condition in depends_on(name).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError


# --- Prometheus ----------------------------------------------------------------------


def test_prometheus_mounts_its_config_and_rules() -> None:
    mounts = {}
    for volume in service("prometheus")["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    config_target = "/etc/prometheus/prometheus.yml"
    assert mounts[config_target] == PROMETHEUS_FILE
    for rule_file in load_yaml(PROMETHEUS_FILE)["rule_files"]:
        target = str(PurePosixPath(config_target).parent / rule_file)
        assert mounts.get(target) == ALERTS_FILE, f"{rule_file} is not mounted at {target}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_prometheus_scrapes_service(name: str) -> None:
    target = f"{name}:{DEFAULT_PORTS[name]}"
    assert target in scrape_targets(), f"prometheus.yml does not scrape {target}"
    assert scrape_targets()[target][1] == "/metrics"


def test_prometheus_scrapes_every_five_seconds() -> None:
    config = load_yaml(PROMETHEUS_FILE)
    for job in config["scrape_configs"]:
        assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert {"alert", "expr", "for"} <= set(rule), rule
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    assert len({rule["alert"] for rule in rules}) == len(rules), "alert names repeat"


def test_alert_rules_use_the_service_metrics() -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    assert used >= HTTP_METRICS
    assert used <= service_metric_names(), "an alert names a metric no service exports"


def test_alerts_cover_errors_latency_and_down_targets() -> None:
    errors = compact(rule_using(HTTP_REQUESTS)["expr"])
    assert 'status=~"5..' in errors
    assert "sumby(service)" in errors, "the 5xx ratio is per service"
    latency = compact(rule_using(HTTP_DURATION_BUCKETS)["expr"])
    assert latency.startswith("histogram_quantile(0.99,")
    assert latency.endswith(">0.5"), "p99 over 500 ms"
    assert compact(rule_using("up")["expr"]) == "up==0"


# --- the image -----------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    bases = instruction_arguments("FROM", dockerfile_instructions())
    assert len(bases) >= 2, "a builder stage and a runtime stage"
    assert instruction_arguments("FROM", final_stage())[0].split()[0] == "python:3.11-slim"
    assert any(
        "pip wheel" in run for run in instruction_arguments("RUN", dockerfile_instructions())
    )
    copied = {
        source.rstrip("/")
        for arguments in instruction_arguments("COPY", dockerfile_instructions())
        if not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }
    assert {"pyproject.toml", "README.md", "services"} <= copied


def test_dockerfile_runs_the_shopstack_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "shopstack" in pyproject["project"]["scripts"]
    assert exec_form("ENTRYPOINT") == ["shopstack"]
    assert exec_form("CMD") == ["serve", "gateway"]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = instruction_arguments("USER", final_stage())
    assert users, "the runtime stage needs a USER line"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_environment() -> None:
    env: dict[str, str] = {}
    for arguments in instruction_arguments("ENV", final_stage()):
        for word in shlex.split(arguments):
            key, _, value = word.partition("=")
            env[key] = value
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/prom"


def test_dockerfile_exposes_every_service_port_and_leaves_health_to_compose() -> None:
    exposed = {
        int(port.split("/")[0])
        for arguments in instruction_arguments("EXPOSE", final_stage())
        for port in arguments.split()
    }
    assert exposed == set(DEFAULT_PORTS.values())
    assert not instruction_arguments("HEALTHCHECK", dockerfile_instructions())


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    patterns = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".data"} <= patterns
    assert not patterns & {"pyproject.toml", "README.md", "services", "*", "*.md"}
