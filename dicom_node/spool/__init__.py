"""The spool: what a received file is, how it is named, written and made durable."""
