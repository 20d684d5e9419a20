"""Compensation passes (quantize, synthesise statistics, allocate, round, re-estimate, solve c, ...) and recipes."""
