"""Trial reporter plugin: ``trial --reporter=durations`` (the class lives in tests/durations.py).

Registered only where ``tests.durations`` can be found -- a checkout, as ``make test`` runs
it -- so an installed hoodyproxy offers Trial no reporter it cannot load.
"""

from importlib.util import find_spec

from twisted.plugin import IPlugin
from twisted.trial.itrial import IReporter
from zope.interface import implementer


@implementer(IPlugin, IReporter)
class _ReporterPlugin:
    """What Trial reads of a reporter plugin: names, and where the class is."""

    def __init__(self, name: str, module: str, klass: str, description: str) -> None:
        self.name = name
        self.module = module
        self.klass = klass
        self.description = description
        self.longOpt = name
        self.shortOpt = None


def _in_a_checkout() -> bool:
    try:
        return find_spec("tests.durations") is not None
    except (ImportError, ValueError):
        return False


if _in_a_checkout():
    durations = _ReporterPlugin("durations", "tests.durations", "DurationsReporter",
                                "the tree reporter, then the ten slowest tests (hoodyproxy's make test)")
