"""smtp-proxy: a multi-tenant SMTP submission relay with a JSON management API."""

__version__ = "0.1.0"
