"""The worker's data plane: hosted stages, session KV caches, sampling, emulation."""
