"""The step store: steps.py (StepStore: the history's verbs and rules), rows.py (records and
rows), payloads.py (payload files), snapshot.py (the cached history), recovery.py (salvage),
trust.py (signatures) and db.py (the only importer of duckdb)."""
