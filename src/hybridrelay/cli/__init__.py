"""The ``hybridrelay`` command line."""
