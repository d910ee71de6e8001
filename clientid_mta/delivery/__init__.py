"""Local delivery: accounts' IMessageDelivery, Maildir, durable files and the in-memory spool."""
