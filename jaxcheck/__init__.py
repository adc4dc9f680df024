"""jaxcheck: fast gradient checks for JAX with a calibrated error model."""

import importlib.metadata

from ._check_grads import check_grads as check_grads
from ._checker import Checker as Checker
from ._error_model import Comparison as Comparison
from ._errors import GradientCheckError as GradientCheckError
from ._health import HealthState as HealthState
from ._health import HealthSummary as HealthSummary
from ._health import LeafHealth as LeafHealth
from ._health import gradient_health as gradient_health
from ._health import health as health
from ._report import LeafResult as LeafResult
from ._report import Report as Report
from ._report import Status as Status
from ._rules import verify_rule as verify_rule
from ._training import CheckRecord as CheckRecord
from ._training import PeriodicCheck as PeriodicCheck
from ._verify import verify as verify

__all__ = [
    "CheckRecord",
    "Checker",
    "Comparison",
    "GradientCheckError",
    "HealthState",
    "HealthSummary",
    "LeafHealth",
    "LeafResult",
    "PeriodicCheck",
    "Report",
    "Status",
    "check_grads",
    "gradient_health",
    "health",
    "verify",
    "verify_rule",
]

try:
    __version__ = importlib.metadata.version("jaxcheck")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree, not installed
    __version__ = "unknown"
