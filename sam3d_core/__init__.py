"""SAM 3D Objects, reimplemented: photo + mask -> placed, textured 3D objects."""

__version__ = "0.1.0"
