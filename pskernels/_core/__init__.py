"""The leaf layer every other layer builds on: backend registry, segment parameters and their validation,
device and finiteness checks. Imports nothing from the rest of the package (``tests/test_architecture.py``)."""
