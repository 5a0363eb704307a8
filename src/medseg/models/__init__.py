"""medseg.models."""
