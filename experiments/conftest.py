"""Doctest collection of experiments/: the current study only.

The archived, superseded study (``archive/fixed_lr_study``) is not collected: its
modules share their basenames (``study.py``, ``report.py``) with these, which
pytest's default import mode cannot collect side by side, and its examples
import names the current study no longer defines.
"""

collect_ignore = ["archive"]
