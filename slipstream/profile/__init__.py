"""Diagnosis: time each phase of a step, name the bottleneck and the lever to pull."""

from slipstream.profile.diagnose import Diagnosis, diagnose
from slipstream.profile.timeline import PHASES, Meter, StepTimer

__all__ = ["PHASES", "Diagnosis", "Meter", "StepTimer", "diagnose"]
