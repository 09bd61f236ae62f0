"""Shipped Prometheus and Grafana files for monitoring an A/B of vLLM servers (see docs/monitoring.md).

A package only so that the files install with it; the paths below locate them.
"""

from pathlib import Path

PROMETHEUS_DIR = Path(__file__).resolve().parent
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RECORDING_RULES = PROMETHEUS_DIR / "recording_rules.yml"
ALERT_RULES = PROMETHEUS_DIR / "alert_rules.yml"
ALERT_RULES_TEST = PROMETHEUS_DIR / "alert_rules_test.yml"
GRAFANA_DASHBOARD = PROMETHEUS_DIR / "grafana_dashboard.json"
