"""Command line: `nemo-plugins <stage> key=value ...`."""
