"""The rule of everything a tap hooks into the request path: never fail the exchange."""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()


def guarded(method):
    """A capture's hook never fails the exchange it watches: a failure is logged and the
    capture stops watching."""
    def wrapper(self, *args):
        if self.failed:
            return None
        try:
            return method(self, *args)
        except Exception:
            self.failed = True
            log.failure("tap: capturing an exchange failed; its events are left out")
            return None
    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper
