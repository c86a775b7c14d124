"""geonorm-fx: rewrite the residual-plus-normalization sites of any PyTorch model into GeoNorm
geodesic updates (arXiv 2601.22095), as an fx compiler pass.

    import geonorm_fx as gf
    report = gf.inspect(model, (input_ids,))        # what would be rewritten, and why not the rest
    module = gf.convert(model, (input_ids,))        # an ordinary, trainable nn.Module
    gf.install(model, (input_ids,))                 # or: the model itself, changed in place (generate, Trainer, ...)
"""
from .api import convert, inspect
from .errors import (CaptureError, ConversionError, GeoNormError, GeoNormWarning, InputShapeError,
                     InvalidInputError, NoSitesError, ScheduleError)
from .geodesic import GeodesicUpdate, geodesic_step
from .install import install, load_updates
from .identity import identity_gap, prenorm_identity_gap
from .oracles import OracleResult, StructuralCheck, check_sites, structural_check
from .module import GeoNormModule
from .report import Report, Site, Skip
from .schedules import decay_constants

__version__ = "0.1.0"

__all__ = [
    "inspect", "convert", "install", "load_updates", "Report", "Site", "Skip", "geodesic_step", "GeodesicUpdate", "decay_constants",
    "GeoNormModule", "prenorm_identity_gap", "identity_gap", "structural_check", "StructuralCheck",
    "check_sites", "OracleResult", "GeoNormError", "CaptureError", "NoSitesError", "ScheduleError", "InvalidInputError",
    "ConversionError", "GeoNormWarning", "InputShapeError",
]
