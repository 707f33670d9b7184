"""Measurement and evaluation: timing, peak memory and error against the reference
(`measure`); long-context tasks arrive here with the evaluation issue."""
