"""qbench's version, in a module of its own: every layer may read it without importing the
package's public face (qbench/__init__.py), which sits above them all."""

__version__ = "0.1.0"
