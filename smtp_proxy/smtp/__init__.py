"""The SMTP submission listener: a pure protocol core and its socket adapter."""
