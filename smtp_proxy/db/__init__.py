"""The database layer: column types, models, engine and sessions, migrations."""
