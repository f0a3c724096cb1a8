"""Train a VGG net the way Simonyan & Zisserman did (ICLR 2015, §3.1).

    python train.py                                   # CPU demo: small net A on the generated sample set
    python train.py --config A --data /data/imagenet --gpus 4
    python train.py --config D --data /data/imagenet --gpus 4   # warm-starts from checkpoints/A/best.pt
    python train.py --config D-S384 --data /data/imagenet --gpus 4
    python train.py --config D --resume               # continue checkpoints/D/last.pt exactly
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py --config D --data ...
    sbatch scripts/slurm/train_multinode.sbatch      # SLURM: stops at the time-limit warning, requeues, goes on
    tensorboard --logdir runs

Exit codes: 0 done; 2 bad input (one `error:` line); 128 + signal after SIGINT (130), SIGUSR1 (138:
SLURM's time-limit warning, "requeue me") or SIGTERM (143) on any process: every process stops at the
same step and last.pt holds it (continue with --resume, or --resume if-exists as scripts/slurm/ do); a
second Ctrl-C stops at once without saving (130, one line).

Any config field can be overridden: `python train.py --config D --lr 0.005 --batch-size 128`.
`python train.py --help` lists them all with the defaults of the config named (`--config D --help`: net D's,
the paper's; without --config: the demo's, configs/demo.yaml).
"""

import argparse
import sys
from pathlib import Path

from vgg.config import available_configs, check_output_dirs, config_defaults, get_args_parser, resolve_config
from vgg.core.distributed import exit_process, set_cpu_threads
from vgg.core.errors import UserError, out_of_memory_message
from vgg.core.launch import launch_if_needed, lost_a_peer, report
from vgg.core.runlock import missing_dirs, remove_empty_dirs
from vgg.training.step import NonFiniteLossError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[get_args_parser(shown_defaults=config_defaults(argv if argv is not None else sys.argv[1:]))],
        epilog="configs: " + ", ".join(available_configs()))
    parser.add_argument("--resume", nargs="?", const="auto", default="",
                        help="continue a run: a run folder or .pt file (default: <out-dir>/<run-name>/last.pt); "
                             "'if-exists': continue <out-dir>/<run-name>/last.pt if there is one, else start "
                             "fresh (what the SLURM templates use, so a requeued job goes on)")
    args = parser.parse_args(argv)
    config, made = None, []
    try:
        config = resolve_config(args)  # every field's range, before any data scan or model build
        made = missing_dirs(Path(config.out_dir) / config.run_name, Path(config.log_dir) / config.run_name)
        check_output_dirs(config)
        launch_if_needed(config.gpus, config.device)  # --gpus N: N processes, then exit with their code
        set_cpu_threads(config.device, config.workers)  # the first log line: how many threads on a CPU run
        from vgg.training.run import run  # imported late: the launcher process needs none of it

        run(config, resume=args.resume)
    except (UserError, NonFiniteLossError) as e:
        report(f"error: {e}")
        return 2
    except (RuntimeError, MemoryError) as e:
        message = out_of_memory_message(e, f"lower --batch-size (now {config.batch_size} over {config.gpus} "
                                           "GPUs) or the net's size (--width, --fc-width)" if config else "")
        if message is None and lost_a_peer(e):  # another process ended first: its own line says why
            report(f"error: another process of the job ended: {str(e).strip().splitlines()[0]}", peer_lost=True)
            return 1
        if message is None:
            raise
        report(f"error: {message}")
        return 2
    finally:
        remove_empty_dirs(made)  # a refused run leaves no empty run folder behind
    return 0


if __name__ == "__main__":
    exit_process(main)
