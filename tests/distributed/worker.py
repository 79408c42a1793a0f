"""One rank of a multi-process test, started by torchrun (or as a plain process with the same
environment variables). Reads a JSON config (argv[1]); writes what this rank saw to
``<out>/rank<r>.json``.

Scenarios:
- ``epoch``: iterate the loader for ``epochs`` epochs; record every batch's step info.
- ``grads``: DDP-train a tiny causal LM; at each step compare the DDP gradient with one computed
  on rank 0 from all ranks' samples of that step (the exact global token mean), and the step's
  global counts with those samples'; record every batch's step info.
- ``resume``: iterate; at ``save_at`` write the state to ``<out>/<state><r>.json`` and stop
  (or, with ``load``, restore it first and iterate to the end).
- ``train``: train the tiny causal LM under ``wrap`` (DDP or FSDP2) with AdamW; at ``save_at``
  checkpoint the loader's state and the model's and optimizer's (``torch.distributed.checkpoint``)
  in ``<out>/<checkpoint>/`` and stop (or, with ``load``, restore them first and train to the
  end); rank 0 writes the final parameters to ``<out>/<params>.pt``; records every step.
- ``die``: rank ``victim`` exits abruptly after ``after`` batches; the others keep iterating.

The dataset is a ``LengthDataset`` of ``lengths`` that every rank reads, or with
``per_rank_lengths`` one of each rank's own list (as when each rank loads its own file), or
with ``stream_uids`` a ``StatefulStream`` of each rank's own uids (of ``lengths``; ``bad_at``: a
uid whose item is not a sample); a stream's step records then name their ``uids``.
``per_rank_indices`` gives each rank its own sampler; ``shard`` is passed when given (``null``
leaves odb's default), else it is False with ``per_rank_indices``. ``reread_fault`` makes
samples read outside the workers (handed-over groups) fail or differ.

Whatever a rank yielded before an error stays in its record, with the error.

``runs``: several loaders one after the other in the same ranks (one launch instead of many),
each with the config updated by one entry; the record then holds one result per run. ``kill``:
once every rank has written its record, each one SIGKILLs itself and its DataLoader workers,
its loaders still mid-pass (as a preempted job dies after its checkpoint).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for its helpers

from streams import StatefulStream
from synthetic import LengthDataset
from tiny import leave_distributed, tiny_model, token_loss_sum

import odb


class FailingDataset(LengthDataset):
    """Raises a sample error for one index."""

    def __init__(self, lengths, bad_index):
        super().__init__(lengths)
        self.bad_index = bad_index

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        if index == self.bad_index:
            sample["labels"] = sample["labels"][:-1]
        return sample


class RereadDataset(LengthDataset):
    """Reads differently outside the DataLoader workers (where odb reads handed-over samples
    again): ``"raise"`` fails there once ``armed`` (after the first batch: the pass's first
    exchange reads a few samples here to compare the ranks' datasets, and with a dataset that
    never reads here odb would not hand groups over at all), ``"unreadable"`` always fails
    there, ``"labels"`` masks one more label token (as a random augmentation might change a
    sample between reads)."""

    def __init__(self, lengths, fault):
        super().__init__(lengths)
        self.fault = fault
        self.armed = fault == "unreadable"

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        if torch.utils.data.get_worker_info() is None:
            if self.fault in ("raise", "unreadable"):
                if self.armed:
                    raise OSError(f"cannot read sample {index} here")
            else:
                sample["labels"][-1] = -100
        return sample


def make_dataset(config, rank):
    if config.get("stream_uids") is not None:
        uids = config["stream_uids"][rank]
        return StatefulStream(uids, config["lengths"], bad_at=config.get("bad_at"))
    if config.get("per_rank_lengths") is not None:
        return LengthDataset(config["per_rank_lengths"][rank])
    lengths = config["lengths"]
    if config.get("bad_index") is not None:
        return FailingDataset(lengths, config["bad_index"])
    if config.get("reread_fault"):
        return RereadDataset(lengths, config["reread_fault"])
    return LengthDataset(lengths)


def make_loader(config, rank):
    options = dict(
        mode=config.get("mode", "padded"),
        num_workers=config.get("num_workers", 0),
        window=config.get("window", 64),
        join=config.get("join", True),
        share_tail=config.get("share_tail", True),
        seed=config.get("seed", 0),
        align_timeout=config.get("align_timeout", 60),
        fetch_size=config.get("fetch_size"),
    )
    if config.get("start_method"):
        options["multiprocessing_context"] = config["start_method"]
    per_rank = config.get("per_rank_indices")
    if per_rank is not None:
        options["sampler"] = per_rank[rank]
    elif config.get("stream_uids") is None:  # a stream is read in its own order
        options["shuffle"] = config.get("shuffle", True)
    shard = config.get("shard", False if per_rank is not None else None)
    if shard is not None:
        options["shard"] = shard
    return odb.DataLoader(make_dataset(config, rank), config.get("budget", 1024), **options)


def info_record(batch):
    info = odb.step_info(batch)
    record = {
        "indices": list(info.sample_indices),
        "ghost": info.ghost,
        "reason": info.reason,
        "step": info.step,
        "round": info.round,
        "local_samples": info.local_samples,
        "global_samples": info.global_samples,
        "local_label_tokens": info.local_label_tokens,
        "global_label_tokens": info.global_label_tokens,
        "loss_weight": info.loss_weight,
        "padded_tokens": info.padded_tokens,
        "tokens_in_batch": int(batch["input_ids"].numel()),
    }
    if "uid" in batch:
        record["uids"] = batch["uid"].tolist()  # the collator made the ints a tensor
    return record


# A scenario fills ``result`` as it goes, so that what it saw before an error is reported too.


def run_epochs(config, rank, loader, result):
    result["epochs"] = []
    for epoch in range(config.get("epochs", 1)):
        loader.set_epoch(epoch)
        records = []
        result["epochs"].append(records)
        for batch in loader:
            records.append(info_record(batch))
            if isinstance(loader.dataset, RereadDataset) and loader.dataset.fault == "raise":
                loader.dataset.armed = True
    result["stats"] = loader.stats().as_dict()


def run_die(config, rank, loader, result):
    records = []
    result["epochs"] = [records]
    for count, batch in enumerate(loader):
        if rank == config["victim"] and count == config["after"]:
            os._exit(17)  # no cleanup, no goodbye: the peers must notice by themselves
        records.append(info_record(batch))


def run_resume(config, rank, loader, result):
    path = Path(config["out"]) / f"{config.get('state', 'state')}{rank}.json"
    records = []
    result["epochs"] = [records]
    if config.get("load"):
        state = json.loads(path.read_text())
        loader.load_state_dict(state)
        records.extend(info_record(batch) for batch in loader)
        return
    for batch in loader:
        records.append(info_record(batch))
        if len(records) == config["save_at"]:
            path.write_text(json.dumps(loader.state_dict()))
            break


def _wrapped(model, wrap: str):
    """The model under DDP, or sharded by FSDP2 (``fully_shard`` per decoder layer, then the
    whole model: the gradients are reduce-scattered and averaged over the ranks as DDP's)."""
    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _full(tensor):
    """A parameter's or gradient's whole tensor (under FSDP2 both are sharded DTensors)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def run_grads(config, rank, loader, result):
    """DDP gradients with odb's loss scale equal one process's exact global token mean.

    Rank 0 records each step whose global counts differ from those of the samples the ranks
    ran (``miscounted``) rather than raising there, which would leave the others waiting in
    the step's collectives. The reference runs each rank's samples as one padded batch (the
    token-loss sum is the same as sample by sample, at a fraction of the forward passes)."""
    dataset = loader.dataset
    vocab = max(512, len(dataset))  # LengthDataset's tokens are the sample's index
    model = tiny_model(vocab=vocab)
    reference = tiny_model(vocab=vocab)  # same init; rank 0 uses it for the one-process gradient
    ddp = _wrapped(model, config.get("wrap", "ddp"))
    pad = odb.PaddedCollator()
    worst, ghosts, shared = 0.0, 0, 0
    records, miscounted = [], []
    result.update(epochs=[records], miscounted=miscounted, steps=0)
    for batch in loader:
        info = odb.step_info(batch)
        records.append(info_record(batch))
        ddp.zero_grad()
        loss = odb.scale_loss(token_loss_sum(ddp, batch), batch, reduction="token")
        loss.backward()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, [] if info.ghost else list(info.sample_indices))
        ghosts += info.ghost
        shared += info.reason == "shared"
        if rank == 0:
            reference.zero_grad()
            total = sum(len(ix) for ix in everyone)
            groups = [[dataset[i] for i in ix] for ix in everyone if ix]
            tokens = sum(int((s["labels"][1:] != -100).sum()) for g in groups for s in g)
            if (tokens, total) != (info.global_label_tokens, info.global_samples):
                miscounted.append(
                    {
                        "step": info.step,
                        "label_tokens": [tokens, info.global_label_tokens],
                        "samples": [total, info.global_samples],
                    }
                )
            loss_sum = sum(token_loss_sum(reference, pad(group)) for group in groups)
            # The tiny model's RMSNorm runs in float32, whose rounding in the backward pass
            # depends on the loss scale: back-propagate the ranks' scale (world / tokens), then
            # divide by the world as DDP does, so only float64 rounding separates the two.
            world = dist.get_world_size()
            (loss_sum * world / tokens).backward()
        result["sharded_grads"] = hasattr(next(model.parameters()).grad, "full_tensor")
        grads = [_full(p.grad) for p in model.parameters()]  # a collective under FSDP2
        if rank == 0:
            for mine, ref in zip(grads, reference.parameters(), strict=True):
                worst = max(worst, float((mine - ref.grad / world).abs().max()))
        result.update(steps=len(records), worst_grad_error=worst, ghosts=ghosts, shared=shared)


def _checkpoint(config, rank, loader, model, optimizer, action: str) -> None:
    """Save or load (``action``) the loader's state (one json per rank) and the model's and
    optimizer's (sharded, through ``torch.distributed.checkpoint``) in one folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(config["out"]) / config.get("checkpoint", "checkpoint")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if action == "save":
        dcp.save(state, checkpoint_id=folder)
        (folder / f"loader{rank}.json").write_text(json.dumps(loader.state_dict()))
        return
    dcp.load(state, checkpoint_id=folder)
    # The load fills FSDP2's sharded parameters and optimizer states in place already (a test
    # that leaves set_state_dict out still passes); set_state_dict is the documented step, and
    # the one that matters when get_state_dict returns copies (full_state_dict, cpu_offload).
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    loader.load_state_dict(json.loads((folder / f"loader{rank}.json").read_text()))


def run_train(config, rank, loader, result):
    """Real training with odb's exact loss scale under DDP or FSDP2, checkpointed and resumed
    as a user would: the loader's ``state_dict`` beside a distributed checkpoint of the model
    and the optimizer."""
    model = tiny_model(vocab=max(512, len(loader.dataset)))
    wrapped = _wrapped(model, config.get("wrap", "ddp"))
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=config.get("lr", 1e-2))
    if config.get("load"):
        _checkpoint(config, rank, loader, wrapped, optimizer, "load")
    records = []
    result["epochs"] = [records]
    for batch in loader:
        records.append(info_record(batch))
        optimizer.zero_grad()
        odb.scale_loss(token_loss_sum(wrapped, batch), batch, reduction="token").backward()
        optimizer.step()
        if len(records) == config.get("save_at"):
            _checkpoint(config, rank, loader, wrapped, optimizer, "save")
            return
    result["sharded"] = hasattr(next(model.parameters()), "full_tensor")
    final = {name: _full(p.detach()) for name, p in model.named_parameters()}  # collectives
    if rank == 0:
        torch.save(final, Path(config["out"]) / f"{config['params']}.pt")


def run(config, rank, result):
    """One loader's scenario, its outcome in ``result``; returns the loader (whose workers live
    as long as it does)."""
    loader = None
    try:
        loader = make_loader(config, rank)
        scenario = config.get("scenario", "epoch")
        runner = {
            "epoch": run_epochs,
            "die": run_die,
            "resume": run_resume,
            "grads": run_grads,
            "train": run_train,
        }
        runner[scenario](config, rank, loader, result)
    except Exception as error:  # reported to the test, which decides what was expected
        result["error"] = f"{type(error).__name__}: {error}"
        result["odb_error"] = isinstance(error, odb.OdbError)
        result["traceback"] = traceback.format_exc()
        result["error_time"] = time.time()
    return loader


def kill_self():
    """SIGKILL this rank and its DataLoader workers, once every rank got here (torchrun stops
    the others as soon as one dies). Under torchrun each rank leads its own process group."""
    if os.getpgid(0) != os.getpid():
        raise RuntimeError("kill needs torchrun: this process does not lead its process group")
    dist.barrier()
    os.killpg(0, signal.SIGKILL)


def main():
    config = json.loads(Path(sys.argv[1]).read_text())
    timeout = datetime.timedelta(seconds=config.get("pg_timeout", 60))
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    out = Path(config["out"])
    result = {"rank": rank}
    if "runs" in config:
        result["runs"] = [{} for _ in config["runs"]]
        pairs = zip(config["runs"], result["runs"], strict=True)
        loaders = [run({**config, **update}, rank, record) for update, record in pairs]
    else:
        loaders = [run(config, rank, result)]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if config.get("kill"):
        kill_self()
    if not any("error" in record for record in [result, *result.get("runs", [])]):
        dist.barrier()
    del loaders  # shuts down the workers of passes left unfinished (before the quick exit)
    leave_distributed()


if __name__ == "__main__":
    main()
