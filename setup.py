"""Packaging metadata lives in setup.cfg."""
from setuptools import setup

setup(packages=["featx", "featx.models", "featx.sources", "featx.registry_data"])
