"""The client names ``outbound/runner.py`` imports, under the module path they had before
the client was split into ``api``, ``results`` and ``protocol``. New code imports
``clientid_mta.client``; this module goes once nothing imports it."""

from clientid_mta.client import ConnectionFailed, RecipientResult, Transaction, send_messages

__all__ = ["ConnectionFailed", "RecipientResult", "Transaction", "send_messages"]
