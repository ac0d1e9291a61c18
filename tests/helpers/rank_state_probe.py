"""Test-only wrapper: run the real trainer and record, per rank, what that rank holds at the end.

    python tests/helpers/rank_state_probe.py OUT_DIR --config ... [key=value ...] [OPTION ...]
    accelerate launch --multi_gpu --num_processes 2 tests/helpers/rank_state_probe.py OUT_DIR --config ... [OPTION ...]

Just before the trainer's own end-of-run check (`carbrand.train.check_ranks_agree`), every rank
writes OUT_DIR/rank<R>.safetensors (its whole state dict, buffers included, the EMA's under
`ema.`) and OUT_DIR/rank<R>.json (its progress counters, and how many gradient all-reduces DDP
ran at optimizer steps and inside gradient-accumulation windows). Tests read these files
themselves instead of trusting the product's check. Options, taken out of the arguments
wherever they stand (the rest goes to the trainer unchanged):

    --stale-listing-on-rank=R      rank R lists no checkpoint in checkpoints/ (a stale directory
                                   cache of the shared file system on another node)
    --unreadable-checkpoint-on-rank=R   rank R cannot read a training checkpoint (its files are
                                   not visible there yet)
    --dynamo-backend=NAME          model.compile with this TorchDynamo backend instead of inductor:
                                   the same wrappers, compiled in seconds on a CPU instead of minutes
    --record-start                 also write, when set-up is done and before the first step,
                                   OUT_DIR/start_rank<R>.safetensors (the model's state dict) and
                                   OUT_DIR/start_rank<R>_optimizer.pt (the optimizer's): after a resume,
                                   what the run really continues from
    --signal-at-step=NAME:STEP     send this process signal NAME (SIGUSR1, SIGKILL, ...) right after
                                   optimizer step STEP, before that step's log or checkpoint: a stop
                                   or a kill -9 at a chosen step, with no race against a poller
    --record-mixes                 write OUT_DIR/mixes_rank<R>.jsonl: each mixup/CutMix draw (its
                                   rank, epoch and micro-batch arguments, kind, weight, partner
                                   order, box) and whether train_step was given that very draw
"""

import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's carbrand, wherever it is installed

import accelerate  # noqa: E402
import torch  # noqa: E402
from accelerate.state import GradientState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import carbrand.checkpoint as checkpoint  # noqa: E402
from carbrand import train  # noqa: E402
from carbrand.errors import CarbrandError  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))  # set by accelerate launch / torchrun; one process: rank 0


def take_options(arguments: list[str]) -> tuple[dict[str, str], list[str]]:
    names = ("--stale-listing-on-rank", "--unreadable-checkpoint-on-rank", "--dynamo-backend", "--record-start",
             "--signal-at-step", "--record-mixes")
    options = {a.partition("=")[0]: a.partition("=")[2] for a in arguments if a.partition("=")[0] in names}
    return options, [a for a in arguments if a.partition("=")[0] not in names]


def count_gradient_all_reduces(counts: dict[str, int]) -> None:
    """Every DDP the trainer prepares reports each bucket all-reduce, inside or outside an accumulation window."""
    prepare_model = accelerate.Accelerator.prepare_model

    def prepare_and_count(self, model, *args, **kwargs):
        prepared = prepare_model(self, model, *args, **kwargs)
        ddp = prepared._orig_mod if hasattr(prepared, "_orig_mod") else prepared  # compiled: the wrapper holds DDP
        if isinstance(ddp, DistributedDataParallel):
            def hook(state, bucket):
                counts["at_step" if GradientState().sync_gradients else "inside_accumulation"] += 1
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, hook)
        return prepared

    accelerate.Accelerator.prepare_model = prepare_and_count


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}


def record_state_at_the_end(out: Path, counts: dict[str, int]) -> None:
    check_ranks_agree = train.check_ranks_agree

    def record_then_check(run) -> None:
        state = state_of(run.unwrapped_model)
        if run.ema_model is not None:
            state |= {f"ema.{name}": tensor for name, tensor in state_of(run.ema_model).items()}
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / f"rank{run.accelerator.process_index}.safetensors"))
        record = {"progress": asdict(run.progress), "all_reduces": counts}
        (out / f"rank{run.accelerator.process_index}.json").write_text(json.dumps(record))
        check_ranks_agree(run)

    train.check_ranks_agree = record_then_check


def record_state_at_the_start(out: Path) -> None:
    set_up = train.set_up

    def set_up_then_record(*args, **kwargs):
        run = set_up(*args, **kwargs)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state_of(run.unwrapped_model), str(out / f"start_rank{RANK}.safetensors"))
        torch.save(run.optimizer.state_dict(), out / f"start_rank{RANK}_optimizer.pt")
        return run

    train.set_up = set_up_then_record


def signal_after_step(name: str, step: int) -> None:
    finish_optimizer_step = train.finish_optimizer_step

    def finish_then_signal(run) -> None:
        finish_optimizer_step(run)
        if run.progress.step == step:
            os.kill(os.getpid(), signal.Signals[name])

    train.finish_optimizer_step = finish_then_signal


def record_mixes(out: Path) -> None:
    draw_mix, train_step = train.draw_mix, train.train_step
    drawn = []

    def draw_and_record(config, **where):
        mix = draw_mix(config, **where)
        drawn.append(mix)
        record = where | {"kind": mix.kind, "weight": mix.weight, "box": mix.box,
                          "permutation": None if mix.permutation is None else [int(i) for i in mix.permutation]}
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"mixes_rank{RANK}.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        return mix

    def step_with(*args):
        with open(out / f"mixes_rank{RANK}.jsonl", "a") as log:
            log.write(json.dumps({"train_step_got_the_draw": args[-1] is drawn[-1]}) + "\n")
        return train_step(*args)

    train.draw_mix, train.train_step = draw_and_record, step_with


def main() -> int:
    out = Path(sys.argv[1])
    options, arguments = take_options(sys.argv[2:])
    if options.get("--stale-listing-on-rank") == str(RANK):
        checkpoint.step_checkpoints = lambda run_dir: []
    if options.get("--unreadable-checkpoint-on-rank") == str(RANK):
        def unreadable(directory):
            raise CarbrandError(f"{directory} is not a complete training checkpoint (needs {checkpoint.MODEL_FILE} "
                                f"and {checkpoint.STATE_FILE})")

        checkpoint.load_training_checkpoint = unreadable
    if "--dynamo-backend" in options:
        plugin = train.TorchDynamoPlugin
        train.TorchDynamoPlugin = lambda **kwargs: plugin(**(kwargs | {"backend": options["--dynamo-backend"]}))
    if "--record-start" in options:
        record_state_at_the_start(out)
    if "--signal-at-step" in options:
        name, _, step = options["--signal-at-step"].partition(":")
        signal_after_step(name, int(step))
    if "--record-mixes" in options:
        record_mixes(out)
    counts = {"at_step": 0, "inside_accumulation": 0}
    count_gradient_all_reduces(counts)
    record_state_at_the_end(out, counts)
    return train.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
