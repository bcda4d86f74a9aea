"""The dashboard's logic: the cluster at a glance, live gateway series, the decision feed.

Pure functions and small in-memory records; the orchestrator's
``dashboard_routes`` module reads the monitor, the store and the metrics and
hands them to these.
"""
