"""The only place that builds queries. Every function takes a session and
leaves the commit to the caller's ``Database.transaction()``; values are always
bound parameters, never formatted into SQL."""
