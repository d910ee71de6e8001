"""clientid-mta: a mail submission server on Twisted with the SMTP CLIENTID extension."""

__version__ = "0.1.0"
