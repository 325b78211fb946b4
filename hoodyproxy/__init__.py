"""hoodyproxy: the per-node HTTPS gateway in which the hostname is the route."""

__version__ = "0.1.0"
