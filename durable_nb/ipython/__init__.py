"""The IPython front end: the magics and the status widget."""
