"""The global reactor, for code that was given none.

Importing ``twisted.internet.reactor`` installs the default reactor. A program that
embeds the server must be able to install its own first (say, ``asyncioreactor``), so
every default imports it only when it is needed, through this one function.
"""

from __future__ import annotations

from typing import Any


def global_reactor() -> Any:
    """``twisted.internet.reactor``, imported (and so installed) only now."""
    from twisted.internet import reactor

    return reactor
