"""Completion and routing: a quiet study becomes jobs for the series the rules select."""
