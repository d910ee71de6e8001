"""Devices: the policy that binds devices to accounts, device keys, the store, approval codes,
notices to account holders and the audit log.
"""
