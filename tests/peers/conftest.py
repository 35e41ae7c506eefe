"""Tests against running peers: each one skips with the reason when its peer binary is missing
(`make peers` installs them). Builders and process wrappers: `helpers.peers`."""
