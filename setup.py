# setuptools needs a setup.py only to wire cffi_modules; metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["build_uring.py:make_ffi"])
