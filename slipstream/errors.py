"""Errors the command line reports in one line of its own (no traceback)."""


class PeerLost(RuntimeError):
    """Another rank of the job is gone (its process died or its node went away)."""
