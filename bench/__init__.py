"""Benchmarks, each run as a script (``python bench/NAME.py``); a package so that tests can
import the pure computations they make of their figures."""
