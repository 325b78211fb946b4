"""The Docker (and Podman) provider: the live map follows the containers a daemon runs.

``twistd -n hoodyproxy --docker`` routes every container labelled ``hoody.project`` as
the daemon starts, stops and removes it (docs/docker.rst).  :class:`DockerProvider` is
the Service; the label grammar and what an inspected container means for the map are
pure functions (:func:`parse_labels`, :func:`read_container`); :class:`LineBuffer` frames
the events stream; :class:`EngineClient` is the GET-only Engine API client.
"""

from hoodyproxy.directory.docker._engine import EngineClient, EngineError, NotFound, socket_path
from hoodyproxy.directory.docker._labels import (InvalidLabel, Labels, Reading, choose_address, parse_labels,
                                                 parse_ports, preferred, read_container)
from hoodyproxy.directory.docker._lines import LineBuffer, LineTooLong
from hoodyproxy.directory.docker._provider import DockerProvider, is_local_address

__all__ = ["DockerProvider", "EngineClient", "EngineError", "InvalidLabel", "Labels", "LineBuffer", "LineTooLong",
           "NotFound", "Reading", "choose_address", "is_local_address", "parse_labels", "parse_ports", "preferred",
           "read_container", "socket_path"]
