"""Cloaks applied by the user: the :class:`Defense` contract, budgets and the registered defenses."""

from __future__ import annotations

from cloakbench.defenses.base import CloakFailure, Defense, DefenseRequirements, ThreatModel, cloak_failures
from cloakbench.defenses.budgets import Budget, quality_report
from cloakbench.defenses.registry import DEFENSES

__all__ = [
    "DEFENSES",
    "Budget",
    "CloakFailure",
    "Defense",
    "DefenseRequirements",
    "ThreatModel",
    "cloak_failures",
    "quality_report",
]
