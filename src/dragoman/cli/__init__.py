"""The ``dragoman`` command line."""
