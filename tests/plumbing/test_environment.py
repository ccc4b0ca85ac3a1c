"""Cores shared among grid points that run side by side (joblib's n_jobs)."""

import pytest
import torch

from plumbing.environment import parallel_jobs, share_cores, usable_cores


@pytest.mark.parametrize(
    "n_jobs,cores,jobs", [(None, 8, 1), (1, 8, 1), (2, 8, 2), (-1, 8, 8), (-2, 8, 7), (-9, 8, 1)]
)
def test_joblib_n_jobs_means_what_joblib_says(n_jobs, cores, jobs):
    assert parallel_jobs(n_jobs, cores) == jobs


def test_each_point_gets_its_share_of_the_cores():
    before = torch.get_num_threads()
    try:
        assert share_cores(1) == (usable_cores(), usable_cores())
        threads, cores = share_cores(-1)  # as many points as cores: one thread each
        assert threads == 1 == torch.get_num_threads() and cores == usable_cores()
    finally:
        torch.set_num_threads(before)
