"""Receiving: DIMSE C-STORE and STOW-RS in, each instance acknowledged only once it is durable."""
