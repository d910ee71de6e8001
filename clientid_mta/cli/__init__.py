"""The clientid-mta administration command."""
