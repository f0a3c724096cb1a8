"""DDP on CPU (gloo): two processes stay identical and match one process on the same global batch."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

from vgg.core.distributed import shard_indices
from vgg.data.batches.loaders import EpochSampler

WORKER = str(ROOT / "tests" / "ddp_worker.py")


def test_two_processes_match_each_other_and_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, WORKER, str(one)], check=True, env=subprocess_env(), timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    WORKER, str(two)], check=True, env=subprocess_env(), timeout=300)
    single, ranks = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert ranks.shape[0] == 2
    assert torch.equal(ranks[0], ranks[1]), "DDP ranks diverged"
    torch.testing.assert_close(ranks[0], single[0], rtol=1e-4, atol=1e-5)

    # The metrics are reduced over ranks: each rank reports the global batch's, as one process does.
    alone = json.loads((tmp_path / "one.pt.rank0.json").read_text())
    per_rank = [json.loads((tmp_path / f"two.pt.rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1]
    for epoch in range(2):
        a, b = alone["train"][epoch], per_rank[0]["train"][epoch]
        assert a["images"] == b["images"] == 8 * 3 and a["step"] == b["step"] == 3
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["top1_err"], b["top5_err"]) == (a["top1_err"], a["top5_err"])
    a, b = alone["val"], per_rank[0]["val"]
    assert a["images"] == b["images"] == 13  # every validation image counted once
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert (b["top1"], b["top1_err"], b["top5_err"]) == (a["top1"], a["top1_err"], a["top5_err"])


def test_epoch_sampler_deals_one_global_order_and_resumes_mid_epoch():
    single = EpochSampler(10, seed=3, rank=0, world_size=1)
    single.set_epoch(2)
    order = list(single)
    assert sorted(order) == list(range(10))
    shards = []
    for rank in range(2):
        s = EpochSampler(10, seed=3, rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append(list(s))
    assert shards[0] == order[0::2] and shards[1] == order[1::2]
    single.set_epoch(2, start=4)
    assert list(single) == order[4:] and len(single) == 6
    single.set_epoch(3)
    assert list(single) != order  # a new shuffle each epoch


def test_shard_indices_cover_every_item_exactly_once():
    shards = [shard_indices(10, rank, 3) for rank in range(3)]
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(10))

