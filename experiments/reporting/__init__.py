"""The pieces of ``experiments/report.py``, one job a module:

* ``runs``: find and read the ``metrics.json`` of training runs; ``groups``: group them, in display order.
* ``paired``: FastClip minus each baseline, paired over seeds, with confidence intervals.
* ``markdown``: the text of ``report.md``.
* ``figures``: the figures' files and captions, drawing them all; ``sigma_figures`` and ``accuracy_figures`` draw
  them, ``style`` holds what they share (colours and markers, fonts, panel layout).
"""

import matplotlib

# The report draws to files, never to a screen: the non-interactive backend, before any module imports pyplot.
matplotlib.use("Agg")
