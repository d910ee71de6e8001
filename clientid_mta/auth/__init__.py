"""Authentication: the credentials, the Cred checker and realm, password backends, the auth
cache, failure budgets and the login thread pool.
"""
