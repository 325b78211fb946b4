"""Drop-in plugins for hoodyproxy (found with :func:`twisted.plugin.getPlugins`).

A third party ships a module as ``hoodyproxy/plugins/<name>.py`` in any directory on
``sys.path``, without an ``__init__.py`` beside it (it would shadow this package).  Its
module-level objects that provide :class:`twisted.plugin.IPlugin` and one of the
interfaces in :mod:`hoodyproxy.interfaces` are found, like Twisted's own
``twisted.plugins``.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]  # noqa: F821
__all__: list[str] = []
