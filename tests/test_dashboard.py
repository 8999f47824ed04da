"""``deploy/grafana/janus.json`` plots exactly the metrics the code declares (the serve ingress and model
replicas', the batch actors'), by the names Ray's Prometheus export gives them. That each one is also
exported after real requests is checked by tests/test_serve_images.py's scrape."""

from __future__ import annotations

import json
import re

from pipeline.actors.metrics import METRICS as BATCH
from pipeline.serve.metrics import METRICS as SERVE
from tests.support import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "janus.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_names() -> dict[str, str]:
    """Every sample name Ray exports for our metrics -> the declared metric."""
    kinds = {name: kind for name, (kind, *_) in SERVE.items()} | BATCH
    return {f"ray_{name}{suffix}": name for name, kind in kinds.items() for suffix in SUFFIXES[kind]}


def dashboard_metrics() -> list[str]:
    """The metric names in every panel's queries."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    names = {m for e in exprs for m in re.findall(r"\b(ray_janus_[a-z0-9_]+)\b", e)}
    return sorted(names)


def test_the_dashboard_plots_every_declared_metric_and_nothing_else():
    plotted = dashboard_metrics()
    names = exported_names()
    assert not [m for m in plotted if m not in names], "plotted but never declared"
    assert {names[m] for m in plotted} == set(SERVE) | set(BATCH), "declared but not plotted"


def test_the_dashboard_is_importable_grafana_json():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["type"] in ("timeseries", "stat", "row") and panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"]
