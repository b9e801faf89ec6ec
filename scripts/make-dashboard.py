#!/usr/bin/env python3
"""Write the chart's Grafana dashboard, helm/fedkube/files/dashboards/fedkube.json, from
the panel list below: the same views as metrics.png and clients.png, drawn from the
coordinator's Prometheus metrics (runtime/coordinator/metrics.py).

    python scripts/make-dashboard.py          # write it
    python scripts/make-dashboard.py --check  # exit 1 when the file differs

tests/deploy/test_chart.py runs the check and proves every metric the panels query is one
the coordinator exports. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent.parent / "helm/fedkube/files/dashboards/fedkube.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCOPE = 'namespace=~"$namespace"'


def rate(metric: str, by: str = "pod") -> str:
    return f"sum by ({by}) (rate({metric}{{{SCOPE}}}[$__rate_interval]))"


def per_round(metric: str) -> str:
    """Bytes per round: the counter's growth over the rounds closed in the same window
    (no point where no round closed)."""
    window = "[5m]"
    return (f"sum by (pod) (increase({metric}{{{SCOPE}}}{window})) / "
            f"sum by (pod) (increase(fedkube_rounds_total{{{SCOPE}}}{window}))")


def quantile(q: float) -> str:
    return f"histogram_quantile({q}, {rate('fedkube_round_duration_seconds_bucket', 'le, pod')})"


# (title, unit, [(PromQL, legend)], width, kind)
PANELS: list[tuple[str, str, list[tuple[str, str]], int, str]] = [
    ("Global model accuracy", "percentunit",
     [(f"fedkube_model_accuracy{{{SCOPE}}}", "{{pod}}")], 8, "timeseries"),
    ("Privacy budget spent (ε)", "none",
     [(f"fedkube_privacy_epsilon{{{SCOPE}}}", "{{pod}}")], 8, "timeseries"),
    ("Round", "none", [(f"fedkube_round_current{{{SCOPE}}}", "{{pod}}")], 8, "stat"),
    ("Round duration (p50, p95)", "s",
     [(quantile(0.5), "p50 {{pod}}"), (quantile(0.95), "p95 {{pod}}")], 12, "timeseries"),
    ("Clients registered and active", "none", [
        (f"fedkube_clients_registered{{{SCOPE}}}", "registered {{pod}}"),
        (f"fedkube_clients_active{{{SCOPE}}}", "active {{pod}}")], 12, "timeseries"),
    ("Updates accepted and refused (per second)", "ops", [
        (rate("fedkube_updates_accepted_total"), "accepted {{pod}}"),
        (rate("fedkube_updates_rejected_total", "pod, reason"), "refused: {{reason}}")],
     12, "timeseries"),
    ("Bytes on the wire (per second)", "Bps", [
        (rate("fedkube_bytes_received_total"), "up {{pod}}"),
        (rate("fedkube_bytes_sent_total"), "down {{pod}}")], 12, "timeseries"),
    ("Compression: bytes per round (up, down)", "bytes", [
        (per_round("fedkube_bytes_received_total"), "up {{pod}}"),
        (per_round("fedkube_bytes_sent_total"), "down {{pod}}")], 12, "timeseries"),
    ("Compression: upload bytes vs raw float32 (1 = uncompressed)", "percentunit",
     [(f"fedkube_compression_ratio{{{SCOPE}}}", "{{pod}}")], 12, "timeseries"),
    ("Time per client (last round, slowest 20)", "s",
     [(f"topk(20, fedkube_client_round_duration_seconds{{{SCOPE}}})", "{{client}}")],
     12, "bargauge"),
    ("Participation (rounds per client)", "none",
     [(f"fedkube_client_rounds_participated{{{SCOPE}}}", "{{client}}")], 12, "bargauge"),
    ("Local training loss per client", "none",
     [(f"fedkube_client_local_loss{{{SCOPE}}}", "{{client}}")], 12, "timeseries"),
    ("Refused requests per client", "none",
     [(f"fedkube_client_rejections{{{SCOPE}}} > 0", "{{client}}")], 12, "bargauge"),
    ("Update bytes per client", "bytes",
     [(f"fedkube_client_bytes_received{{{SCOPE}}}", "{{client}}")], 12, "bargauge"),
    ("Clients without per-client series (over the limit)", "none",
     [(f"fedkube_clients_untracked{{{SCOPE}}}", "{{pod}}")], 12, "stat"),
]


def panel(number: int, x: int, y: int, spec: tuple) -> dict:
    title, unit, queries, width, kind = spec
    return {
        "id": number, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": width, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if kind == "timeseries" else {},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend,
                     "refId": chr(ord("A") + index)}
                    for index, (expr, legend) in enumerate(queries)],
    }


def dashboard() -> dict:
    panels, x, y = [], 0, 0
    for number, spec in enumerate(PANELS, start=1):
        width = spec[3]
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(number, x, y, spec))
        x += width
    variable = {"type": "datasource", "name": "datasource", "label": "Prometheus",
                "query": "prometheus", "current": {}, "hide": 0}
    namespace = {"type": "query", "name": "namespace", "label": "Namespace", "datasource": DS,
                 "query": "label_values(fedkube_round_current, namespace)",
                 "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
                 "current": {}, "hide": 0}
    return {
        "uid": "fedkube-jobs", "title": "fedkube: federated jobs", "tags": ["fedkube"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [variable, namespace]},
        "panels": panels,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    text = json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"
    if parser.parse_args().check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python scripts/make-dashboard.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
