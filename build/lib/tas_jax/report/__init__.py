"""Reports: the data behind each figure, the figures, and the markdown of a pipeline directory.

  python -m tas_jax.cli.report runs/demo        # (re)writes runs/demo/report.md and runs/demo/figures/
"""

from tas_jax.report.data import (accuracy_points, arch_prob_data, depth_data, read_jsonl, search_curves,
                                 training_curves, width_data)
from tas_jax.report.markdown import REPORT_FILE, summary_rows, write_report

__all__ = ["REPORT_FILE", "accuracy_points", "arch_prob_data", "depth_data", "read_jsonl", "search_curves",
           "summary_rows", "training_curves", "width_data", "write_report"]
