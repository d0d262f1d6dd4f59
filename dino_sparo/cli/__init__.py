"""Command-line front ends: argument parsing and exit codes, kept out of the library modules."""
