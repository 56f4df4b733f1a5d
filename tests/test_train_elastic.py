"""Elastic restarts across nodes: the ranks of a restarted worker group form their process group under a store
prefix they all agree on, whatever each node's TORCHELASTIC_RESTART_COUNT (teskd_fast.train.distributed)."""

import datetime
import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from teskd_fast.train import distributed as D


def _stale_store(store):
    """What an earlier attempt's handshake left in torchrun's store."""
    store.set("teskd_fast/leader", "stale")
    store.set("teskd_fast/answer/stale/1", "old1")
    store.set("teskd_fast/members/stale", "old1")


def test_ranks_agree_on_the_attempt_over_an_earlier_attempts_keys():
    store = dist.HashStore()
    _stale_store(store)
    got = {}

    def rank(r):
        got[r] = D._agree_attempt(store, r, 3, datetime.timedelta(seconds=20), poll_s=0.005)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 2)]
    for t in threads:  # ranks 1 and 2 first: they read the stale leader
        t.start()
    threading.Event().wait(0.1)
    threads.append(threading.Thread(target=rank, args=(0,)))
    threads[-1].start()
    for t in threads:
        t.join(30)
    assert len(set(got.values())) == 1 and got[0] != "stale", got


def _worker(rank, port, counts, out_dir):
    # One rank per "node": torchrun's agents gave them different restart counts (the other node rejoined).
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RUN_ID="test",
                      TORCHELASTIC_RESTART_COUNT=str(counts[rank]), TESKD_FAST_DIST_TIMEOUT="20")
    torch.set_num_threads(1)
    try:
        env = D.setup("cpu")
        result = str(float(D.all_reduce(torch.tensor([rank + 1.0]), env)[0]))
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    finally:
        D.cleanup()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(result)


@pytest.mark.slow  # two spawned processes: about 20 s on a loaded 2-core machine
def test_nodes_with_different_restart_counts_form_one_group(tmp_path):
    # torchrun's shared store (the agent's, kept across restarts) with an earlier attempt's keys in it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    _stale_store(store)
    # A timeout of 20 s each (TESKD_FAST_DIST_TIMEOUT): a prefix per count failed here in 20 s.
    mp.start_processes(_worker, args=(store.port, (1, 0), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["3.0", "3.0"]
