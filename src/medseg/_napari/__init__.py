"""napari contributions (reader, writer, sample data, widgets). Only this package imports napari/Qt."""
