"""The detector's self-checks (GEONORM.md section 6); the code lives in :mod:`geonorm_fx.oracles`.

Kept so that ``from geonorm_fx.identity import prenorm_identity_gap`` goes on working.
"""
from .oracles.identities import identity_gap, prenorm_identity_gap, run_identities

__all__ = ["identity_gap", "prenorm_identity_gap", "run_identities"]
