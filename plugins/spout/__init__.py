"""Spout bridge (Windows): a Spout sender in, the daemon, a Spout sender out."""

from .bridge import SpoutBridge, SpoutSettings, spout_unavailable_reason

__all__ = ["SpoutBridge", "SpoutSettings", "spout_unavailable_reason"]
