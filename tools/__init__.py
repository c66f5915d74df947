"""Command-line tools around fsam-ds runs."""
