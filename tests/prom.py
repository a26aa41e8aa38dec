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

from .conftest import free_port, scale, service_missing

ROOT = Path(__file__).resolve().parents[1]


def binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        service_missing(f"{name} is not installed (Debian package 'prometheus')")
    return path


def rule_files() -> list[Path]:
    return sorted(p for p in (ROOT / "alerts").glob("*.yml") if "alertmanager" not in p.name)


def fast_rules(dest: Path, for_override: str = "2s") -> list[Path]:
    """Copies of the alert rules with every ``for:`` shortened, so a test sees alerts fire in
    seconds; expressions and labels are untouched."""
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

    def targets_up(self) -> bool:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        active = r["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout * scale()
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"{what} not seen within {timeout * scale():.0f}s\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextmanager
def run_prometheus(
    workdir: Path, targets: dict[str, list[int]], rules: list[Path]
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (job name → ports on 127.0.0.1) every second."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rules],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
            }
            for job, ports in targets.items()
        ],
    }
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(proc, port, log_path)
    try:
        prom.wait_for(lambda: _ready(prom), 30, "prometheus ready")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(prom: Prometheus) -> bool:
    try:
        return httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


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
