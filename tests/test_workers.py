"""DataLoader workers: one start (`init_worker`: seeded, the stop signals left to the main process)
and one shutdown (`shutdown_workers`) for every loader of ours."""

from __future__ import annotations

import functools
import random
import signal

import torch

from axs_lib.data import TileDataset, validation_loader
from axs_lib.loader import ResumableLoader
from axs_lib.signals import STOP_SIGNALS
from axs_lib.workers import init_worker, shutdown_workers


def test_a_worker_leaves_stop_signals_to_the_main_process_is_seeded_and_runs_the_users_init_last():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    calls = []
    try:
        torch.manual_seed(1234)
        init_worker(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in STOP_SIGNALS)
        first = random.random()
        torch.manual_seed(1234)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        init_worker(0, user_init=lambda worker_id: calls.append((worker_id, signal.getsignal(signal.SIGTERM))))
        assert random.random() == first  # seed_worker ran: python's generator follows torch's seed
        assert calls == [(0, signal.SIG_IGN)]  # the user's init sees the signals ignored already
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_the_training_and_validation_loaders_start_their_workers_the_same_way():
    val = validation_loader(TileDataset([], seed=0, augment=False), batch_size=2, num_workers=2, seed=5)
    assert val.worker_init_fn is init_worker
    user = print
    with ResumableLoader(list(range(8)), 2, seed=0, num_workers=2, worker_init_fn=user) as train:
        init = train._loader.worker_init_fn
        assert isinstance(init, functools.partial) and init.func is init_worker and init.keywords == {"user_init": user}


def test_shutdown_workers_stops_persistent_workers_now_and_is_a_no_op_without_them():
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True,
                                         worker_init_fn=init_worker)
    assert [int(b.sum()) for b in loader] == [1, 5, 9, 13]
    workers = list(loader._iterator._workers)
    assert all(w.is_alive() for w in workers)
    shutdown_workers(loader)
    assert loader._iterator is None and not any(w.is_alive() for w in workers)
    shutdown_workers(loader)  # nothing left to stop
    shutdown_workers(None)  # no validation loader
