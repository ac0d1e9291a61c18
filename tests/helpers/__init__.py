"""Shared by several test files: paths, ports, real process runs, test images, and scripts tests start."""
