"""pytest plugin for mutation runs (setup.cfg [mutmut]): one torch thread per test process.

tests/conftest.py gives torch 2 threads, right for one pytest on 2 cores; mutmut runs several test
processes at once, and torch's thread pools fighting over the same cores make small ops many times
slower. Loaded with `-p tools.pytest_one_thread`; applied once conftest.py has run.
"""

import torch


def pytest_collection_finish(session):
    torch.set_num_threads(1)
