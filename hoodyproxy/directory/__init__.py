"""The live container map: the model, and the embedded SQLite directory (the default)."""

from hoodyproxy.directory._db import open_database
from hoodyproxy.directory._model import Container, InvalidContainer, container_from_json
from hoodyproxy.directory.sqlite import SQLiteDirectory

__all__ = ["Container", "InvalidContainer", "SQLiteDirectory", "container_from_json", "open_database"]
