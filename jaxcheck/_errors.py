"""The exceptions jaxcheck raises."""


class GradientCheckError(AssertionError):
    """A gradient check did not pass; the message is the full report.

    Subclasses `AssertionError` so that pytest shows the report as the failure text.
    The report itself is available as the `report` attribute.
    """

    def __init__(self, report):
        super().__init__(str(report))
        self.report = report


GradientCheckError.__module__ = "jaxcheck"
