"""The sample notebooks are inputs to tests/test_plugin.py (which copies them into pytester
folders); they are not tests themselves, and half of them fail the replay check on purpose."""

collect_ignore_glob = ["*.ipynb"]
