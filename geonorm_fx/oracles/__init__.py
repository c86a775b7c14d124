"""The detector's oracles: judges of a site list by other means than the detector's own logic.

- :func:`identity_gap` / :func:`prenorm_identity_gap`: the Pre-Norm and Post-Norm identities of
  GEONORM.md section 6, run on an affine-free, tiny-eps copy (:mod:`.identities`, :mod:`.affine`);
- :func:`local_gaps`: the per-site branch-invariance check, a local Pre-Norm identity with no global
  precondition (:mod:`.local`);
- :func:`structural_check`: the report against the model's module tree (:mod:`.structure`);
- :func:`check_sites`: all of them at once, for zoo sweeps (:mod:`.check`).
"""
from .affine import AffineFree, affine_free_copy
from .check import OracleResult, check_sites
from .identities import (IdentityOutcome, SiteCheck, geodesic_star, identity_gap, norm_magnitude, post_identity,
                         prenorm_identity_gap, run_identities)
from .local import LocalCheck, local_checks, local_gaps
from .structure import StructuralCheck, structural_check

__all__ = ["identity_gap", "prenorm_identity_gap", "run_identities", "IdentityOutcome", "SiteCheck",
           "geodesic_star", "post_identity", "affine_free_copy", "AffineFree", "structural_check",
           "StructuralCheck", "check_sites", "OracleResult", "local_gaps", "local_checks", "LocalCheck",
           "norm_magnitude"]
