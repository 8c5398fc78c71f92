"""pelmark: pelvic landmark detection in fluoroscopy with a 2D/3D registration loss."""

__version__ = "0.1.0"
