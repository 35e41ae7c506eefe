"""The inference tests: volumes, models, phantoms, training and evaluation; no network, no
database (the same wall as the package's)."""
