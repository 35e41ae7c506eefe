"""Observation: metrics, health and readiness probes, the job watcher, logs and the audit trail."""
