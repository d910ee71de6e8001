"""The twistd dropin: makes ``twistd -n clientid-mta`` find the server."""

from twisted.application.service import ServiceMaker

clientidMTA = ServiceMaker(
    "clientid-mta",
    "clientid_mta.server.tap",
    "Mail submission server with the SMTP CLIENTID extension",
    "clientid-mta",
)
