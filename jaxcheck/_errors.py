"""The exceptions jaxcheck raises."""


class GradientCheckError(AssertionError):
    """A gradient check did not pass; the message is the full report.

    Subclasses `AssertionError` so that pytest shows the report as the failure text.
    The report itself is available as the `report` attribute; `message` replaces its text
    (the same report in the words of the function that raised).
    """

    def __init__(self, report, message: str | None = None):
        super().__init__(str(report) if message is None else message)
        self.report = report


GradientCheckError.__module__ = "jaxcheck"


class CotangentKind(Exception):
    """Raised inside a check (never to the caller) where autodiff returns a complex
    gradient for a real parameter leaf or a real one for a complex leaf: `leaves` holds
    (index among the differentiable leaves, the name of the gradient's dtype)."""

    def __init__(self, leaves: list):
        super().__init__(leaves)
        self.leaves = leaves


# what a custom rule must return, said where JAX cannot differentiate one at all
RULE_OUTPUTS = (
    "a custom_vjp's fwd returns (output, residuals) and its bwd a tuple with one cotangent "
    "per primal input, shaped like it ((g,) for one input); a custom_jvp's rule returns "
    "(output, tangent) with the output's shape and dtype."
)


def one_line(err: BaseException, limit: int = 300, typed: bool = True) -> str:
    """`err`'s type (unless not `typed`) and the first line of its message, for a report's
    list of problems; a line longer than `limit` characters is cut at a word, with " ..."
    after it."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] + " ..."
    if not typed:
        return first
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# how the refusal of an order >= 2 check says that a derivative map cannot be differentiated
NO_DERIVATIVE = "has no derivative of its own"

# how to put arrays committed to different devices together, which jax.jit refuses
SAME_DEVICES_HOW = (
    "jax.jit, and so the check, needs every array on the same devices: move them with "
    "jax.device_put(x, device), or shard them all over one mesh."
)
