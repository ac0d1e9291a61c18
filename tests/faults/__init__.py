"""Fault injection: real processes killed, signalled, starved of disk or fed bad input (issue 7)."""
