"""The GPU monitor: NVML figures for the GUI and the terminal, CUPTI paging counters for the worker.

No Qt here (the page lives in ``gui/pages/monitor_page.py``) and no torch at import time:
``paging.py`` imports torch only inside the functions the training worker calls.
"""
