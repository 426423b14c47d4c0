"""Sandbox backends: each starts an instance from a spec, stops it and reports its death."""

from workers.sandbox.base import Sandbox, SandboxBackend, SandboxSpec, SandboxStartError

__all__ = ["Sandbox", "SandboxBackend", "SandboxSpec", "SandboxStartError"]
