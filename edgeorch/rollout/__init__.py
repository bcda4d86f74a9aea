"""Reconfiguration Broadcast core: plan versions, signing, the rollout state machine (DESIGN.md §6.3)."""
