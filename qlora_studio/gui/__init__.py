"""The desktop app: PySide6 widgets over the plain layer, with training in a separate process.

The GUI process never imports torch (nor transformers, peft, bitsandbytes) at start-up and never
touches CUDA: a run is a worker process (``python -m qlora_studio train ... --events``) watched by
:mod:`qlora_studio.gui.supervisor`, so a crash in native code cannot take the window down and every
byte of GPU memory goes back when the run ends. The worker outlives a closed or crashed window, and
a later window follows it again through its run folder (:mod:`qlora_studio.gui.follower`). Jobs
that need a tokenizer or a model run in a subprocess too (:mod:`qlora_studio.gui.dataset_scan`, the
playground and export workers).

Start it with ``qlora-studio`` or ``python -m qlora_studio.gui``.
"""

from . import qt_compat

qt_compat.apply()  # before any window, chart or signal: see qt_compat for the PySide6 bug
