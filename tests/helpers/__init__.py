"""Builders and peers shared by the tests (imported as `helpers.<module>`)."""
