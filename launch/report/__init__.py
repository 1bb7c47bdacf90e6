"""The report of a run or a sweep (launch/report/build.py), rebuilt from the run folders' files alone:
`python -m launch.report DIR`."""
from launch.report.build import build_report, write_report
from launch.report.contents import Report

__all__ = ["Report", "build_report", "write_report"]
