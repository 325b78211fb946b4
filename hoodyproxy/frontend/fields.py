"""A request's header fields as the gateway reads them: a list of (name, value) pairs.

The frontends build one :class:`Fields` per request instead of a
``twisted.web.http_headers.Headers``: the gateway only looks fields up
(:meth:`~Fields.getRawHeaders`, :meth:`~Fields.hasHeader`) and walks them
(:meth:`~Fields.getAllRawHeaders`), the three methods of ``Headers`` it uses, with the
same results, except that names keep the spelling the client sent instead of being
re-capitalized (HTTP/2 and HTTP/3 send them in lower case).  Building it costs one list;
the index by lower-case name is built on the first lookup, once.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

_T = TypeVar("_T")


class Fields:
    """Header fields in the order received; names compared without regard to case."""

    __slots__ = ("pairs", "_index")

    def __init__(self, pairs: list[tuple[bytes, bytes]] | None = None) -> None:
        """``pairs``: the (name, value) pairs, owned by this object from now on."""
        #: The (name, value) pairs in the order received, names as sent (what is forwarded).
        self.pairs = pairs if pairs is not None else []
        #: lower-case name -> (the name as first seen, [values]); built on first use.
        self._index: dict[bytes, tuple[bytes, list[bytes]]] | None = None

    def add(self, name: bytes, value: bytes) -> None:
        """One more field, as received (HTTP/1.1 builds its fields as llhttp parses them)."""
        self.pairs.append((name, value))
        index = self._index
        if index is not None:
            entry = index.get(name.lower())
            if entry is None:
                index[name.lower()] = (name, [value])
            else:
                entry[1].append(value)

    def _indexed(self) -> dict[bytes, tuple[bytes, list[bytes]]]:
        index: dict[bytes, tuple[bytes, list[bytes]]] = {}
        for name, value in self.pairs:
            key = name.lower()
            entry = index.get(key)
            if entry is None:
                index[key] = (name, [value])
            else:
                entry[1].append(value)
        self._index = index
        return index

    def getRawHeaders(self, name: bytes, default: _T | None = None) -> list[bytes] | _T | None:
        """The values of the field ``name`` (any case) in the order received, or ``default``."""
        index = self._index if self._index is not None else self._indexed()
        entry = index.get(name.lower())
        return default if entry is None else entry[1]

    def hasHeader(self, name: bytes) -> bool:
        """Whether a field ``name`` (any case) is present."""
        index = self._index if self._index is not None else self._indexed()
        return name.lower() in index

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        """(name, [values]) per distinct name, in the order names were first seen."""
        index = self._index if self._index is not None else self._indexed()
        return iter(index.values())

    def __repr__(self) -> str:
        return f"Fields({self.pairs!r})"
