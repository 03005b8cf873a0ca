"""latentdub: photorealistic AI video dubbing compatible with LatentSync 1.5 / 1.6."""

__version__ = "0.1.0"
