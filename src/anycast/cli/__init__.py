"""The ``anycast`` command line."""
