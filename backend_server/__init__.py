"""FaceRecon backend: reconstruction pipeline, batch command line and ZeroMQ server."""

__version__ = "0.1.0"
