"""medseg.train."""
