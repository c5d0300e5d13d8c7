"""Helpers shared by several test modules, by topic; test modules import these, never each other."""
