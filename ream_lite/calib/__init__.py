"""Calibration and evaluation text: sources, mixing ratios, tokenization, sequences, the built-in corpus.

`build_calibration` is the entry point for `compress`; `text.read_documents` / `text.domain_windows` serve `eval`.
"""

from ream_lite.calib.build import CalibrationSet, build_calibration, planned_counts
from ream_lite.calib.mix import parse_mix
from ream_lite.calib.sequences import PACKING_MODES
from ream_lite.calib.sources import SPEC_HELP, parse_source

__all__ = [
    "PACKING_MODES", "SPEC_HELP", "CalibrationSet", "build_calibration", "parse_mix", "parse_source", "planned_counts",
]
