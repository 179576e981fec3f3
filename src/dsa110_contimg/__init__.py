"""dsa110-contimg: lights-out continuum imaging for the DSA-110 radio telescope."""

__version__ = "0.1.0"
