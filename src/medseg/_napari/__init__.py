"""napari contributions: reader, writer, sample data and dock widgets.

Only this package imports napari/Qt, and only its widget modules do so at import time; the
manifest (``napari.yaml``) points every command into a submodule, so napari's start-up imports
nothing heavy from medseg.
"""
