"""medseg.predict."""
