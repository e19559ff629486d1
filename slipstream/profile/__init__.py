"""Diagnosis: time each phase of a step, record it per rank, name the bottleneck, the lever
to pull and what pulling it should gain."""

from slipstream.profile.doctor import Finding, Models, examine, run_finding
from slipstream.profile.measure import load_records, measure
from slipstream.profile.timeline import PHASES, Meter, StepTimer

__all__ = [
    "PHASES",
    "Finding",
    "Meter",
    "Models",
    "StepTimer",
    "examine",
    "load_records",
    "measure",
    "run_finding",
]
