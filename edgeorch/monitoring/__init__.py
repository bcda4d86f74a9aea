"""Monitoring & Capacity Profiling: estimators, change detection, cluster state (pure, no I/O)."""
