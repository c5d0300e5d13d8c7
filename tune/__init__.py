"""Thin Ray Tune programs (`python -m tune.sweep`); the library code is diffscaler.train.sweep."""
