"""Pydantic models shared at every service boundary."""
