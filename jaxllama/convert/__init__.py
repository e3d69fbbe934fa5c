"""Checkpoint conversion to and from other frameworks; every converter maps the one canonical tree."""
