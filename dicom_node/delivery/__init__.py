"""Delivery: the durable outbox and the senders that store results at their destinations."""
