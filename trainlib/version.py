"""The library version, in a module of its own: setup.cfg reads it without importing the package, and
modules that record it (checkpoints) import it without importing the package that imports them."""
__version__ = "0.2.0"
