"""The queue worker: claims queued messages, routes them and hands them to providers."""
