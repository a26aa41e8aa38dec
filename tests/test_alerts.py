"""Alert rules: promtool check and unit tests, and the contract every alert keeps."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from .prom import ROOT, binary, rule_files

RUNBOOKS = ROOT / "docs" / "runbooks.md"


def alerts() -> list[dict]:
    out = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += [r for r in group["rules"] if "alert" in r]
    return out


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [binary("promtool"), "check", "rules", *map(str, rule_files())],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    tests = sorted((ROOT / "alerts" / "tests").glob("*.yml"))
    assert tests
    result = subprocess.run(
        [binary("promtool"), "test", "rules", *map(str, tests)],
        capture_output=True,
        text=True,
        cwd=ROOT / "alerts" / "tests",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_labels_annotations_and_a_runbook() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    names = set()
    for rule in alerts():
        names.add(rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "page", "ticket"), rule["alert"]
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], rule["alert"]
        anchor = ann["runbook_url"].rsplit("#", 1)[1]
        assert ann["runbook_url"].split("#")[0].endswith("docs/runbooks.md")
        assert anchor in anchors, f"{rule['alert']}: no section '{anchor}' in docs/runbooks.md"
    required = {
        "RunwatchDeliverySLOFastBurn",
        "RunwatchDeliverySLOSlowBurn",
        "RunwatchIncompleteRuns",
        "RunwatchUnpairedToolCalls",
        "RunwatchStuckRuns",
        "RunwatchCrossUserDelivery",
        "RunwatchAuditStoreDown",
        "RunwatchAuditWriteErrors",
        "RunwatchMonitorLag",
        "RunwatchSlowConsumerDisconnects",
        "RunwatchAgentErrorRate",
        "RunwatchRuntimeDown",
        "RunwatchMonitorDown",
    }
    assert required <= names
    assert (
        next(a for a in alerts() if a["alert"] == "RunwatchCrossUserDelivery")["labels"]["severity"]
        == "critical"
    )


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in (ROOT / "alerts" / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check["exp_alerts"] else silent).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "never tested firing"
    assert names - silent == set(), "never tested silent"


def test_burn_rate_windows_and_factors() -> None:
    rules = {a["alert"]: a["expr"] for a in alerts()}
    fast, slow = rules["RunwatchDeliverySLOFastBurn"], rules["RunwatchDeliverySLOSlowBurn"]
    for window, factor in (("1h", "14.4"), ("5m", "14.4"), ("6h", "6"), ("30m", "6")):
        assert f"rate{window} > {factor}" in fast
    for window, factor in (("1d", "3"), ("2h", "3"), ("3d", "1"), ("6h", "1")):
        assert f"rate{window} > {factor}" in slow
    recorded = {
        r["record"]
        for p in rule_files()
        for g in yaml.safe_load(Path(p).read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        assert f"runwatch:delivery_sli_error_ratio:rate{w}" in recorded
        assert f"runwatch:delivery_burn_rate:rate{w}" in recorded


def _first_value(values: str) -> float | None:
    """The first present sample of a promtool ``values`` string (``None`` if it has none)."""
    for token in values.split():
        if token.startswith("_") or token == "stale":
            continue
        # "0x5", "0+100x40", "1": the first sample is the number before any + or x.
        return float(re.split(r"(?<=.)[+x]", token)[0])
    return None


def test_every_alert_fires_on_the_first_fault_since_start() -> None:
    """Each alert has a case that starts with a fresh process, as runwatch exports it: no
    series before the start (``_``), every counter from 0, and the alert firing on the fault."""
    counters = re.compile(r"^runwatch_\w+(_total|_count|_bucket)\{")
    covered: set[str] = set()
    for path in (ROOT / "alerts" / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            if not case["name"].startswith("first fault since start: "):
                continue
            for series in case["input_series"]:
                values = str(series["values"])
                assert values.startswith("_"), (case["name"], series["series"])
                if counters.match(series["series"]):
                    assert _first_value(values) == 0, (case["name"], series["series"])
            alert = case["name"].split(": ", 1)[1].split(",")[0]
            checks = [c for c in case["alert_rule_test"] if c["alertname"] == alert]
            assert any(c["exp_alerts"] for c in checks), case["name"]
            assert any(not c["exp_alerts"] for c in checks), f"{case['name']}: never silent"
            covered.add(alert)
    assert {a["alert"] for a in alerts()} - covered == set(), "no first-fault case"


def test_absence_alerts_do_not_depend_on_job_names() -> None:
    """One scrape job for ``runwatch serve``, two for the split deployment: no rule may name
    a job, or one of the two deployments would be blind."""
    for path in rule_files():
        assert "job=" not in path.read_text() and "job=~" not in path.read_text(), path
