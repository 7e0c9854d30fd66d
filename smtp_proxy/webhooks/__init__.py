"""Delivery events for tenants: signed webhooks fed from a durable outbox."""
