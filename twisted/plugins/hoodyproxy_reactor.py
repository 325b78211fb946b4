"""Reactor plugin: ``twistd --reactor=hoodyproxy`` / ``trial --reactor=hoodyproxy``.

The gateway's own reactor (hoodyproxy/reactor.py), which ``twistd -n hoodyproxy`` installs
by itself; named here so that ``make test`` runs every test on the reactor a node runs.
"""

from twisted.application.reactors import Reactor

hoodyproxy = Reactor("hoodyproxy", "hoodyproxy.reactor",
                     "epoll without a log context per event, writes held until a batch of events is done")
