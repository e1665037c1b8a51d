"""What a person reads: the spike analysis figure and the sweep report."""

from iq_transform.reports.spike_plot import plot_spike_report
from iq_transform.reports.sweep import write_report

__all__ = ["plot_spike_report", "write_report"]
