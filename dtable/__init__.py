"""
dtable: an encrypted, replicated table of JSON objects for Twisted.
"""
