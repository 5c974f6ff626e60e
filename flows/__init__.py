"""Thin Prefect flows over the library packages. The environment defaults (distill/env.py) apply on
import, so that a program importing the flows before Prefect gets them too (library logs in the UI)."""

from distill.env import apply_env_defaults

apply_env_defaults()
