"""``gf.install`` and ``gf.convert`` under DDP and FSDP2 (``fully_shard`` per layer), 2 CPU processes (gloo).

Each rank trains on its own half of a batch; the result must be the same on both ranks, and equal to one
process training on the whole batch (gradients averaged over ranks = the gradient of the mean loss)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _model_and_data(how: str):
    sys.path.insert(0, ROOT)
    import geonorm_fx as gf
    from tests.install_models import causal_lm, perturb_updates

    model, ids = causal_lm("llama")
    batch = torch.randint(1, 90, (4, 8), generator=torch.Generator().manual_seed(3))
    if how.startswith("convert"):
        model.config.use_cache = False
        model = gf.convert(model, (batch[:2],))
        assert all(p.dim() >= 1 for p in model.parameters())  # FSDP2 shards no 0-dim parameter
    else:
        gf.install(model, (ids,), backend="eager", fullgraph=(how != "install-fsdp"))
    perturb_updates(model)
    return model, batch


def _loss(model, ids):
    out = model(ids) if not hasattr(model, "config") else model(ids, labels=ids)
    if hasattr(out, "loss") and out.loss is not None:
        return out.loss
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for ids in batches:
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()


def _full_state(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("module.", "", 1) if name.startswith("module.") else name] = value.detach().clone()
    return out


def _worker(rank: int, world: int, how: str, store: str, result: str):
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, batch = _model_and_data(how)
        model.train()
        mine = batch[rank * 2:(rank + 1) * 2]
        if how.endswith("ddp"):
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
            _train(wrapped, [mine] * STEPS)
        else:
            from torch.distributed.fsdp import fully_shard

            if how.startswith("install"):  # the model's own layers; a converted module has one graph
                for layer in model.model.layers:
                    fully_shard(layer)
            fully_shard(model)
            _train(model, [mine] * STEPS)
        state = _full_state(model)
        torch.save(state, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["install-ddp", "install-fsdp", "convert-fsdp"])
def test_two_processes_agree_with_one(tmp_path, how):
    mp.spawn(_worker, args=(2, how, str(tmp_path / "store"), str(tmp_path / "state")), nprocs=2, join=True)
    rank0 = torch.load(f"{tmp_path / 'state'}.0", weights_only=True)
    rank1 = torch.load(f"{tmp_path / 'state'}.1", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert any(k.startswith("geonorm") for k in rank0)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    # one process on the whole batch
    torch.manual_seed(0)
    model, batch = _model_and_data(how)
    model.train()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    _train(model, [batch] * STEPS)
    for name, p in model.named_parameters():
        torch.testing.assert_close(rank0[name], p.detach(), atol=2e-5, rtol=1e-4)
    moved = [n for n, p in model.named_parameters() if n.startswith("geonorm") and not torch.equal(start[n], p)]
    assert moved
