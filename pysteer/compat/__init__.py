"""Readers for interventions saved by other libraries (``pysteer.compat.pyreft``: pyreft's LoReFT)."""
