"""Figure helpers: a log axis labelled with plain numbers."""

import matplotlib.pyplot as plt
import pytest

from plumbing.figures import new_figure, plain_log_x


@pytest.mark.parametrize(
    "limits, shown, hidden",
    [
        ((1.2, 2.8), {"1.4", "2", "2.6"}, set()),  # within a decade: every minor tick, plainly
        ((0.08, 12), {"0.1", "1", "10"}, {"0.3", "4"}),  # two decades: minor labels thinned
    ],
)
def test_a_log_axis_is_labelled_with_plain_numbers(limits, shown, hidden):
    """Matplotlib's default labels a range within one decade 1.2×10^0, 1.4×10^0, ..., which
    overlap in a small panel (the tuning report's ρ axis did)."""
    fig, axes = new_figure()
    ax = axes[0][0]
    ax.plot(limits, [0, 1])
    plain_log_x(ax)
    ax.set_xlim(*limits)
    fig.canvas.draw()
    labels = {
        t.get_text()
        for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
        if t.get_text() and limits[0] <= t.get_position()[0] <= limits[1]
    }
    plt.close(fig)
    assert shown <= labels and not hidden & labels
    assert not any("10^" in t or "times" in t or "e-" in t for t in labels), labels
