"""The chart's PrometheusRule, rendered by the real helm and run by the real promtool: the rules
load, and each alert fires (and only then) on the series of tests/chart/data/alerts*.test.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helm import one, render

DATA = Path(__file__).parent / "data"
CUSTOM = {
    "additionalRuleLabels": {"team": "serving"},
    "alerts": {
        "notReady": {"for": "30m", "severity": "page"},
        "rateSourceDown": {"enabled": False},
    },
}


def promtool() -> str:
    found = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(found).exists():
        raise FileNotFoundError("no promtool: install Debian's prometheus package")
    return found


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.parametrize(
    ("values", "tests", "rules"),
    [({}, "alerts.test.yaml", 4), (CUSTOM, "alerts-custom.test.yaml", 3)],
    ids=["defaults", "custom"],
)
def test_alerts_fire_on_their_series(
    values: dict[str, Any], tests: str, rules: int, tmp_path: Path
) -> None:
    rule = one(render({"prometheusRule": {"enabled": True, **values}}), "PrometheusRule")
    # The PrometheusRule's spec is a Prometheus rule file: its groups as they are.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    shutil.copy(DATA / tests, tmp_path / tests)
    assert f"SUCCESS: {rules} rules found" in run("check", "rules", "rules.yaml", cwd=tmp_path)
    out = run("test", "rules", tests, cwd=tmp_path)
    assert "SUCCESS" in out


def test_promtool_test_fails_when_an_alert_does_not_fire(tmp_path: Path) -> None:
    """The unit tests above can fail: with notReady turned off, the expected alert is missing."""
    values = {"prometheusRule": {"enabled": True, "alerts": {"notReady": {"enabled": False}}}}
    rule = one(render(values), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    shutil.copy(DATA / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "alertname: MelangeAllocationNotReady, time: 16m" in result.stdout + result.stderr
