"""Test helpers for plugin authors: verifyObject mixins, one per extension point.

Mix one into a ``twisted.trial.unittest.TestCase`` and implement ``make_provider``::

    class MyDirectoryTests(ContainerDirectoryTestsMixin, unittest.TestCase):
        def make_provider(self):
            return MyDirectory(...)
"""

from __future__ import annotations

from zope.interface.verify import verifyObject

from hoodyproxy.interfaces import IAuditSink, ICertificateSource, IContainerDirectory, IServiceKind


class _ProviderTestsMixin:
    interface = None

    def make_provider(self):
        raise NotImplementedError("return the object under test")

    def test_provides_interface(self):
        """The provider declares and fully implements the interface."""
        self.assertTrue(verifyObject(self.interface, self.make_provider()))


class ContainerDirectoryTestsMixin(_ProviderTestsMixin):
    """For :class:`IContainerDirectory` providers; also checks the put/lookup/delete contract."""

    interface = IContainerDirectory

    def test_put_lookup_delete(self):
        """What is put can be looked up and listed; what is deleted is gone."""
        from hoodyproxy.directory import Container
        directory = self.make_provider()
        container = Container("a" * 24, "b" * 24, "192.0.2.10", "running", {})
        directory.put(container)
        self.assertEqual(directory.lookup("a" * 24), container)
        self.assertEqual([c.id for c in directory.list("b" * 24)], ["a" * 24])
        self.assertTrue(directory.delete("a" * 24))
        self.assertIsNone(directory.lookup("a" * 24))
        self.assertFalse(directory.delete("a" * 24))


class AuditSinkTestsMixin(_ProviderTestsMixin):
    """For :class:`IAuditSink` providers."""

    interface = IAuditSink


class CertificateSourceTestsMixin(_ProviderTestsMixin):
    """For :class:`ICertificateSource` providers."""

    interface = ICertificateSource


class ServiceKindTestsMixin(_ProviderTestsMixin):
    """For :class:`IServiceKind` providers."""

    interface = IServiceKind
