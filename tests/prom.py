"""A real Prometheus for tests: Debian's ``prometheus`` binary scraping a running runwatch."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from .conftest import scale, service_missing

ROOT = Path(__file__).resolve().parents[1]


def binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        service_missing(f"{name} is not installed (Debian package 'prometheus')")
    return path


def rule_files() -> list[Path]:
    return sorted(p for p in (ROOT / "alerts").glob("*.yml") if "alertmanager" not in p.name)


#: The delivery SLI's windows shortened for a test, in the same order (5m < 30m < 1h < ...).
SHORT_SLI_WINDOWS = {
    "5m": "10s",
    "30m": "20s",
    "1h": "30s",
    "2h": "40s",
    "6h": "60s",
    "1d": "90s",
    "3d": "120s",
}


def fast_rules(
    dest: Path, for_override: str = "2s", sli_windows: dict[str, str] | None = None
) -> list[Path]:
    """Copies of the alert rules with every ``for:`` shortened, so a test sees alerts fire in
    seconds; expressions and labels are untouched, except that ``sli_windows`` (e.g.
    :data:`SHORT_SLI_WINDOWS`) replaces the range of every delivery SLI recording rule, so the
    burn-rate alerts see a fault within seconds too (the rule names stay)."""
    out = []
    for path in rule_files():
        doc = yaml.safe_load(path.read_text())
        for group in doc.get("groups", []):
            group["interval"] = "1s"
            for rule in group.get("rules", []):
                if "alert" in rule and "for" in rule:
                    rule["for"] = for_override
                if "alert" in rule and "keep_firing_for" in rule:
                    rule["keep_firing_for"] = "0s"
                if sli_windows and rule.get("record", "").startswith("runwatch:delivery_"):
                    rule["expr"] = re.sub(
                        r"\[(\w+)\]", lambda m: f"[{sli_windows[m.group(1)]}]", rule["expr"]
                    )
        target = dest / path.name
        target.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(target)
    return out


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}: {body.get('error')}")
        return list(body["data"]["result"])

    def alerts(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/alerts", timeout=10)
        return list(r.json()["data"]["alerts"])

    def firing(self, name: str) -> bool:
        return any(
            a["labels"].get("alertname") == name and a["state"] == "firing" for a in self.alerts()
        )

    def samples(self, selector: str, window_s: int) -> list[tuple[float, float]]:
        """The raw samples (timestamp, value) of the single series ``selector`` selects over
        the last ``window_s`` seconds, summed across series when several match."""
        by_ts: dict[float, float] = {}
        for series in self.query(f"{selector}[{window_s}s]"):
            for ts, value in series["values"]:
                by_ts[float(ts)] = by_ts.get(float(ts), 0.0) + float(value)
        return sorted(by_ts.items())

    def targets_up(self) -> bool:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        active = r["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout * scale()
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"{what} not seen within {timeout * scale():.0f}s\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def documented_config(deployment: str) -> dict[str, Any]:
    """The ``prometheus.yml`` that docs/operations.md shows for ``deployment`` (``embedded``
    or ``split``): the YAML block whose first line is ``# prometheus.yml (<deployment>...``."""
    text = (ROOT / "docs" / "operations.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        if block.startswith(f"# prometheus.yml ({deployment}"):
            return dict(yaml.safe_load(block))
    raise AssertionError(f"docs/operations.md shows no prometheus.yml ({deployment}: ...)")


def scrape_config(
    deployment: str, targets: dict[str, list[int]], rules: list[Path]
) -> dict[str, Any]:
    """The documented config with each documented target replaced by the test's processes of
    that kind (``targets``: documented target → ports on 127.0.0.1; a documented target the
    test does not run is dropped); intervals 1 s, the given rule files, no Alertmanager.
    Jobs, their names and how targets are grouped stay as documented."""
    config = documented_config(deployment)
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s"}
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(p) for p in rules]
    config.pop("alerting", None)
    documented = set()
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        for static in job["static_configs"]:
            documented |= set(static["targets"])
            static["targets"] = [
                f"127.0.0.1:{port}" for t in static["targets"] for port in targets.get(t, [])
            ]
    assert set(targets) <= documented, f"not in the documented config: {set(targets) - documented}"
    return config


_LISTENING = re.compile(r'msg="Listening on" address=127\.0\.0\.1:(\d+)')


@contextmanager
def run_prometheus(workdir: Path, config: dict[str, Any]) -> Iterator[Prometheus]:
    """Prometheus with ``config`` (see :func:`scrape_config`), on a port it binds itself
    (``127.0.0.1:0``) and reports in its log, so no other process can take it first."""
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                "--web.listen-address=127.0.0.1:0",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(proc, 0, log_path)
    try:
        prom.wait_for(lambda: _listening(prom) and _ready(prom), 30, "prometheus ready")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening(prom: Prometheus) -> bool:
    """True once Prometheus logged the port it listens on (then ``prom.port`` is set)."""
    if prom.proc.poll() is not None:
        raise AssertionError(f"prometheus exited with {prom.proc.returncode}:\n{prom.log()}")
    found = _LISTENING.search(prom.log_path.read_text(errors="replace"))
    if found:
        prom.port = int(found.group(1))
    return found is not None


def _ready(prom: Prometheus) -> bool:
    try:
        return httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def resolve_variables(prom: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """The dashboard's query variables as Grafana resolves them with "All" picked: each
    ``label_values(selector, label)`` asked of Prometheus, the values regex-escaped and joined
    as ``(a|b)`` (Grafana's Prometheus interpolation of a multi-value variable)."""
    out: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        selector = concrete(m.group(1), out)
        r = httpx.get(
            f"{prom.url}/api/v1/label/{m.group(2)}/values", params={"match[]": selector}, timeout=10
        ).json()
        values = [re.sub(r"([\\^$*+?.()|{}\[\]'])", r"\\\\\1", v) for v in r["data"]]
        out[var["name"]] = "(" + "|".join(values) + ")"
    return out


_GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "1h",
    "${__range}": "1h",
}


def concrete(expr: str, variables: dict[str, str] | None = None) -> str:
    """A Grafana panel query as Prometheus can run it: built-in interval variables and
    template variables replaced (multi-value ``$var`` → ``.*``)."""
    for key, value in _GRAFANA_VARS.items():
        expr = expr.replace(key, value)
    for key, value in (variables or {}).items():
        expr = expr.replace("${" + key + "}", value).replace("$" + key, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)
