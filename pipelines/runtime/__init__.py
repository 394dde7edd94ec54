"""Shared run machinery: stages and their counters, the sink, runner options, the run check, progress."""
