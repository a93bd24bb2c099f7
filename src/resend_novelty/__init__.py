"""ReSeND: semantic novelty detection via relational reasoning."""
__version__ = "0.1.0"
