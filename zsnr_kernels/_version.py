"""The package version, in one module that imports nothing (the compiled modules' loaders compare their build
against it without importing the package root, which imports everything)."""

__version__ = "0.1.0"
