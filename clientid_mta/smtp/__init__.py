"""The wire: the submission protocol, its framing, SASL, message bodies, addresses, the
CLIENTID grammar, TLS and session limits. Imports no storage.
"""
