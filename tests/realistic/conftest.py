"""The realistic notebooks are inputs to tests/test_realistic.py (which copies them into
pytester folders and runs the replay check on them there); they are not tests themselves."""

collect_ignore_glob = ["*.ipynb"]
