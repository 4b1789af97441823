"""The step store (steps as rows, payload files, trust) and the database layer (db.py, the only
importer of duckdb)."""
