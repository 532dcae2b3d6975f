"""Architecture specs (data, not code) and site resolution."""

from .sites import SITE_KINDS, Site, parse_site, resolve_site
from .specs import (
    ARCH_SPECS,
    ArchSpec,
    ModelGeometry,
    UnsupportedArchitecture,
    geometry,
    get_spec,
    layer_modules,
)

__all__ = [
    "ARCH_SPECS",
    "ArchSpec",
    "ModelGeometry",
    "SITE_KINDS",
    "Site",
    "UnsupportedArchitecture",
    "geometry",
    "get_spec",
    "layer_modules",
    "parse_site",
    "resolve_site",
]
