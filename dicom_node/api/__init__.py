"""The HTTP API: the REST endpoints over the index and their bearer-token check."""
