"""A request's header fields as the gateway reads them: a list of (name, value) pairs.

The frontends build one :class:`Fields` per request instead of a
``twisted.web.http_headers.Headers``: the gateway only looks fields up
(:meth:`~Fields.getRawHeaders`, :meth:`~Fields.hasHeader`) and walks them
(:meth:`~Fields.getAllRawHeaders`), the three methods of ``Headers`` it uses, with the
same results, except that names keep the spelling the client sent instead of being
re-capitalized (HTTP/2 and HTTP/3 send them in lower case).  Building it costs one list
and the names in lower case (the HTTP/1.1 frontend has them already; otherwise made on the
first lookup, once): a lookup scans that list in C, and the gateway's header filter reads
it instead of lowering each name again.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

_T = TypeVar("_T")


class Fields:
    """Header fields in the order received; names compared without regard to case."""

    __slots__ = ("pairs", "lnames", "_index")

    def __init__(self, pairs: list[tuple[bytes, bytes]] | None = None) -> None:
        """``pairs``: the (name, value) pairs, owned by this object from now on (none: the
        HTTP/1.1 frontend appends each pair and its lower-case name as llhttp parses them)."""
        #: The (name, value) pairs in the order received, names as sent (what is forwarded).
        self.pairs = pairs if pairs is not None else []
        #: Their names in lower case, one for one (None: made on first use).  Whoever
        #: appends a pair appends its lower-case name in the same statement; a list that
        #: is not one for one is never read (:meth:`lower_names` makes it again).
        self.lnames: list[bytes] | None = [] if pairs is None else None
        #: lower-case name -> (the name as first seen, [values]); built on first use.
        self._index: dict[bytes, tuple[bytes, list[bytes]]] | None = None

    def lower_names(self) -> list[bytes]:
        """The names in lower case, one for each pair, in order (made once; the list is the
        object's own: read it, do not change it)."""
        lnames = self.lnames
        if lnames is None or len(lnames) != len(self.pairs):
            # (a pair appended without its name is still compared by its name)
            lnames = self.lnames = [name.lower() for name, _ in self.pairs]
        return lnames

    def _indexed(self) -> dict[bytes, tuple[bytes, list[bytes]]]:
        index: dict[bytes, tuple[bytes, list[bytes]]] = {}
        for (name, value), key in zip(self.pairs, self.lower_names()):
            entry = index.get(key)
            if entry is None:
                index[key] = (name, [value])
            else:
                entry[1].append(value)
        self._index = index
        return index

    def getRawHeaders(self, name: bytes, default: _T | None = None) -> list[bytes] | _T | None:
        """The values of the field ``name`` (any case) in the order received, or ``default``."""
        key = name.lower()
        lnames = self.lnames
        if lnames is None or len(lnames) != len(self.pairs):
            lnames = self.lower_names()
        # A scan of a short list in C: cheaper than building an index for a few lookups.
        if key not in lnames:
            return default
        if lnames.count(key) == 1:
            return [self.pairs[lnames.index(key)][1]]
        return [value for (_, value), lname in zip(self.pairs, lnames) if lname == key]

    def hasHeader(self, name: bytes) -> bool:
        """Whether a field ``name`` (any case) is present."""
        lnames = self.lnames
        if lnames is None or len(lnames) != len(self.pairs):
            lnames = self.lower_names()
        return name.lower() in lnames

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        """(name, [values]) per distinct name, in the order names were first seen."""
        index = self._index if self._index is not None else self._indexed()
        return iter(index.values())

    def __repr__(self) -> str:
        return f"Fields({self.pairs!r})"
