"""twistd plugin: ``twistd -n hoodyproxy`` (the options and makeService live in hoodyproxy.service)."""

from twisted.application.service import ServiceMaker

hoodyproxy = ServiceMaker(
    "hoodyproxy", "hoodyproxy.service", "the per-node HTTPS gateway: the hostname is the route", "hoodyproxy"
)
