"""Grafana dashboards: a valid JSON model, the grid, units, datasource variable, real metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml
from prometheus_client import CollectorRegistry

from monitor.metrics import MonitorMetrics
from runtime.metrics import RuntimeMetrics

from .prom import ROOT, rule_files

DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


def exposed_names() -> set[str]:
    registry = CollectorRegistry()
    RuntimeMetrics(registry)
    MonitorMetrics(registry)
    names = set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
        if family.type == "counter":
            names.add(family.name + "_total")
    recorded = {
        r["record"]
        for p in rule_files()
        for g in yaml.safe_load(p.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    return names | recorded | {"up"}


_FUNCS = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "time",
    "le",
    "or",
    "and",
    "vector",
    "absent",
    "without",
    "on",
    "bool",
    "count",
    "avg",
    "irate",
    "unless",
}


def metric_names(expr: str) -> set[str]:
    cleaned = re.sub(r"\{[^}]*\}", "", expr)
    cleaned = re.sub(r"\[[^\]]*\]", "", cleaned)
    cleaned = re.sub(r'"[^"]*"', "", cleaned)
    cleaned = re.sub(r"\bby \([^)]*\)", "", cleaned)
    cleaned = re.sub(r"\boffset \d+[smhdwy]+", "", cleaned)
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", cleaned))
    return {t for t in tokens if t not in _FUNCS and not t.startswith("__")}


def test_generated_dashboards_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_dashboard_models() -> None:
    assert {p.name for p in DASHBOARDS} == {"overview.json", "delivery-slo.json", "run-health.json"}
    uids = set()
    known = exposed_names()
    for path in DASHBOARDS:
        text = path.read_text()
        assert "${DS_" not in text and "__inputs" not in text
        model = json.loads(text)
        assert model["uid"] not in uids and re.fullmatch(r"[a-z0-9-]{1,40}", model["uid"])
        uids.add(model["uid"])
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert (
            variables["datasource"]["type"] == "datasource"
            and variables["datasource"]["query"] == "prometheus"
        )
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids))
        for p in model["panels"]:
            pos = p["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0, p[
                "title"
            ]
            assert p["fieldConfig"]["defaults"].get("unit"), (
                f"{path.name}: {p['title']} has no unit"
            )
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"]
            for t in p["targets"]:
                unknown = metric_names(t["expr"]) - known
                assert not unknown, f"{path.name}: {p['title']}: unknown metrics {unknown}"
    assert len(uids) == 3


def test_rule_expressions_use_real_metrics() -> None:
    known = exposed_names()
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                unknown = metric_names(rule["expr"]) - known
                assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_metric_name_parser_sees_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(runwatch_x_bucket{le="1.0"}[5m]))) or vector(0)'
    )
    assert metric_names(expr) == {"runwatch_x_bucket"}


SCOPE = '{job=~"$job", instance=~"$instance"'


def test_job_and_instance_variables_list_runwatch_targets() -> None:
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        for name in ("job", "instance"):
            var = variables[name]
            assert var["type"] == "query" and var["includeAll"] and var["multi"], path.name
            query = var["query"]["query"]
            assert query == var["definition"]
            assert "runwatch_build_info" in query and "runwatch_monitor_build_info" in query
            assert query.endswith(f", {name})")
        assert 'job=~"$job"' in variables["instance"]["query"]["query"]


def test_every_raw_metric_is_read_through_the_job_and_instance_variables() -> None:
    """The same panels serve one scrape job (runwatch serve) and two (runtime + monitor);
    only the recording rules, which aggregate every target, are read unscoped."""
    for path in DASHBOARDS:
        for p in json.loads(path.read_text())["panels"]:
            for t in p["targets"]:
                expr = t["expr"]
                for name in metric_names(expr):
                    if ":" in name:
                        assert "SLI" in p["title"] or p["description"], (
                            f"{path.name}: {p['title']}: say that a recording rule is service-wide"
                        )
                        continue
                    for hit in re.finditer(rf"\b{name}\b", expr):
                        assert expr[hit.end() :].startswith(SCOPE), (
                            f"{path.name}: {p['title']}: {name} not scoped: {expr}"
                        )
