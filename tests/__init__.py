"""The test suite as a regular package.

A regular package (not a namespace folder) so that ``from tests.test_fit import ...`` finds
these files even when an installed distribution ships its own top-level ``tests`` package
(torch-fidelity 0.4.0 does).
"""
