"""``python -m medseg`` runs the command line."""

from medseg.cli import entry

entry()
