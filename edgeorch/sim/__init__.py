"""Simulated nodes that speak the real control-plane protocol, hundreds per process (bench/scale.py)."""
