"""The evaluation report: numbers, PR curves, AP by size, confusion matrix, TIDE errors, the worst
images and training curves, as one HTML page with PNGs beside it (`write_report`).

Modules: `matching` (COCOeval's matches per image), `errors` (confusion matrix, TIDE),
`ranking` (worst images), `figures` and `curves` (matplotlib), `html` (the page), `build`.
"""

from gfldet.report.build import (
    ReportDirError,
    check_report_dir,
    post_processing_settings,
    source_of_checkpoint,
    write_report,
)

__all__ = ["ReportDirError", "check_report_dir", "post_processing_settings",
           "source_of_checkpoint", "write_report"]
