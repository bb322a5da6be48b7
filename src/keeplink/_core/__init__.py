"""The sans-IO core: errors, backoff, state tables, codecs, correlation.

Nothing in this package awaits, reads a clock or touches a socket. Time is passed in.
"""
