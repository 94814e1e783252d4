"""REPA-E training: ``deepspeed repa_e_fast/train.py``, ``torchrun ... repa_e_fast/train.py``
or ``python -m repa_e_fast.train`` with ``--config configs/<setup>.yaml`` and the official
flags (see ``config.py``).

This file reads config -> build -> loop. The pieces live in ``engine/``: the process group
(``runtime.py``), the loader, models, backend and step (``build.py``), what a checkpoint holds
and resuming (``official_format.py``; the files themselves: ``checkpoint.py``), sample grids
and metrics (``reporting.py``), the run folder and the PREEMPTED marker (``run_folder.py``)
and signals (``preemption.py``).

The loop is the official one: one REPA-E step per batch (``engine/step.py``), EMA, logging of
the official values, periodic sample grids and checkpoints. Around it, what a long run on a
shared cluster needs: checks before anything expensive, exact resume (``--resume auto``),
atomic checkpoints, SIGTERM/SIGINT/SIGUSR1 (or the launcher's death) -> checkpoint,
``<run>/PREEMPTED`` and exit 75, and non-finite steps skipped then, after
``max_consecutive_faults`` in a row, exit 65.
"""

import json
import os
import sys
import time
from typing import Optional

if __package__ in (None, ""):
    # Run as a script (deepspeed/torchrun launch a file): import the package, not siblings.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch.distributed as dist

from repa_e_fast.config import ConfigError, TrainConfig, parse_config, validate_files, validate_world
from repa_e_fast.engine.build import build_backend, build_loader, build_models, build_step
from repa_e_fast.engine.checkpoint import CheckpointManager, RunFolderError, RunLock
from repa_e_fast.engine.official_format import (Progress, check_resumed_config, choose_resume, init_from_official,
                                                load_checkpoint, read_resume_state, save_checkpoint)
from repa_e_fast.engine.peers import watch_peers
from repa_e_fast.engine.preemption import PreemptionFlag
from repa_e_fast.engine.reporting import (LOGGED_CURVES, MetricsLogger, plot_loss_curves, read_metrics, reduce_logs,
                                          sample_grid, write_optional)
from repa_e_fast.engine.run_folder import PREEMPTED_MARKER, prepare_run_folder, write_preempted_marker
from repa_e_fast.engine.runtime import (Runtime, agree_on_start, close_log_file, launcher_name, log, open_log_file,
                                        seed_everything, setup_runtime)
from repa_e_fast.errors import RepaEFastError

EXIT_OK = 0
EXIT_ERROR = 2  # bad configuration, data or checkpoint: nothing was trained
EXIT_FAULTS = 65  # too many consecutive non-finite steps; the last good checkpoint is intact
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT/SIGUSR1 or launcher gone: a checkpoint was written; rerun with --resume auto


class TrainingAborted(RepaEFastError, RuntimeError):
    pass


def train(config: TrainConfig, runtime: Runtime, launcher: Optional[str] = None) -> int:
    """``launcher``: "deepspeed", "torchrun" or None (started directly)."""
    micro_batch = validate_world(config, runtime.world_size)
    validate_files(config)
    experiment = config.experiment_dir
    manager = CheckpointManager(experiment / "checkpoints", keep_last=config.keep_last_checkpoints)
    lock = RunLock(experiment)
    try:
        return _train(config, runtime, micro_batch, manager, lock, launcher)
    finally:
        close_log_file()
        lock.release()


def _train(config: TrainConfig, runtime: Runtime, micro_batch: int, manager: CheckpointManager, lock: RunLock,
           launcher: Optional[str]) -> int:
    experiment = config.experiment_dir
    error = None
    if runtime.is_main:
        try:
            prepare_run_folder(config, manager, lock, runtime)
        except (ConfigError, RunFolderError) as caught:
            error = caught
    agree_on_start(runtime, error)
    if runtime.is_main:  # before the resume checks, so their notices are in log.txt too
        open_log_file(experiment / "log.txt")
    resume_from = choose_resume(config, manager)
    resumed = read_resume_state(resume_from, runtime) if resume_from is not None else None
    if resumed is not None:
        check_resumed_config(config, resumed, runtime)
    seed_everything(config.seed + runtime.rank)
    if runtime.is_main:
        (experiment / "args.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    loader = build_loader(config, runtime, micro_batch)
    log(runtime, f"{runtime.distributed} backend, {runtime.world_size} rank(s) on {runtime.device}; "
                 f"{loader.num_images} images, {loader.num_classes} classes, {len(loader)} batches/epoch/rank")
    models = build_models(config, runtime)
    backend = build_backend(config, runtime, models, micro_batch)
    step_fn = build_step(config, backend, models["ema"], models["encoders"])

    if resumed is not None:
        progress = load_checkpoint(resumed, config, runtime, models, backend, loader)
        log(runtime, f"resumed from {resume_from} at step {progress.step}")
    elif config.init_from:
        progress = init_from_official(config.init_from, config, runtime, models, backend)
        log(runtime, f"initialised from {config.init_from} (step {progress.step})")
    else:
        progress = Progress()
    logger = MetricsLogger(experiment, config.report_to, config.to_dict(), config.wandb_project, config.exp_name,
                           resume=resume_from is not None, wandb_run_id=progress.wandb_run_id,
                           resume_step=progress.step) if runtime.is_main else None
    if logger is not None:
        progress.wandb_run_id = logger.wandb_run_id
    if logger is not None and resume_from is not None:
        logger.truncate_after(progress.step)

    preemption = PreemptionFlag(launcher)
    bar = None
    if runtime.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_train_steps, initial=progress.step, desc="train", dynamic_ncols=True,
                   mininterval=2.0)
    last_saved = progress.step if resume_from is not None else -1
    window_start, window_images = time.perf_counter(), 0
    try:
        while progress.step < config.max_train_steps and loader.epoch < config.epochs:
            for batch in loader:
                sync = backend.sync_step
                if config.train_mode == "ldm":
                    moments, images, labels = batch
                    logs = step_fn(moments, labels, images=images)
                else:
                    images, labels = batch
                    logs = step_fn(images, labels, progress.step)
                window_images += images.shape[0] * runtime.world_size
                if step_fn.last_fault is not None:
                    progress.skipped_steps += 1
                    progress.consecutive_faults += 1
                    log(runtime, f"step {progress.step}: non-finite {step_fn.last_fault}; update skipped "
                                 f"({progress.consecutive_faults} in a row, {progress.skipped_steps} in total)")
                    if progress.consecutive_faults >= config.max_consecutive_faults:
                        good = manager.complete_checkpoints()
                        raise TrainingAborted(
                            f"{progress.consecutive_faults} consecutive steps had non-finite values (last: "
                            f"{step_fn.last_fault}); stopping. The last good checkpoint is "
                            f"{good[-1] if good else 'none (no checkpoint was written yet)'}")
                    continue
                if not sync:
                    continue
                progress.consecutive_faults = 0
                progress.step += 1
                progress.images_seen += config.batch_size
                if progress.step % config.log_every == 0 or progress.step == config.max_train_steps:
                    values = reduce_logs(logs, runtime)
                    elapsed = time.perf_counter() - window_start
                    values.update(epoch=loader.epoch, images_per_sec=window_images / max(elapsed, 1e-9),
                                  skipped_steps=progress.skipped_steps)
                    window_start, window_images = time.perf_counter(), 0
                    if logger is not None:
                        logger.log(progress.step, values)
                        shown = {short: f"{values[key]:.4f}" for key, short in
                                 (("sit_loss", "sit"), ("vae_loss", "vae"), ("d_loss", "d")) if key in values}
                        bar.set_postfix(**shown, img_s=f"{values['images_per_sec']:.1f}", refresh=False)
                if bar is not None:
                    bar.update(1)
                if runtime.is_main and (progress.step == 1 or progress.step % config.sampling_steps == 0):
                    grid = write_optional(runtime, "sample grid", lambda: sample_grid(
                        config, runtime, models, progress.step, experiment / "samples",
                        real_images=images))
                    if grid is not None:
                        logger.log_image(progress.step, "samples", grid)
                if progress.step % config.checkpointing_steps == 0:
                    save_checkpoint(manager, config, runtime, models, backend, loader, progress)
                    last_saved = progress.step
                if preemption.raised(runtime):
                    if last_saved != progress.step:
                        save_checkpoint(manager, config, runtime, models, backend, loader, progress)
                    reason = preemption.reason or "another rank"
                    if runtime.is_main:
                        write_preempted_marker(experiment, progress.step, reason)
                    log(runtime, f"preempted by {reason}: checkpoint at step {progress.step} written, "
                                 f"{experiment / PREEMPTED_MARKER} marks it; rerun with --resume auto")
                    return EXIT_PREEMPTED
                if progress.step >= config.max_train_steps:
                    break
        if last_saved != progress.step:
            save_checkpoint(manager, config, runtime, models, backend, loader, progress)
        if runtime.is_main:
            grid = write_optional(runtime, "sample grid", lambda: sample_grid(
                config, runtime, models, progress.step, experiment / "samples"))
            if grid is not None:
                logger.log_image(progress.step, "samples", grid)
            write_optional(runtime, "loss curve", lambda: plot_loss_curves(
                read_metrics(logger.path), LOGGED_CURVES, experiment / "loss_curve.png"))
            stats = getattr(loader, "stats", {})
            log(runtime, f"done: {progress.step} steps, {progress.skipped_steps} skipped, "
                         f"{stats.get('bad_images', 0)} bad images skipped; outputs in {experiment}")
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    return EXIT_OK


def main(argv=None) -> int:
    try:
        config, launcher_local_rank = parse_config(argv)
        runtime = setup_runtime(config.distributed, config.device, config.allow_tf32, config.dist_timeout,
                                launcher_local_rank, cudnn_benchmark=True)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with watch_peers(config.dist_timeout):  # a lost node: one message naming it, exit 76
            return train(config, runtime, launcher_name(launcher_local_rank))
    except TrainingAborted as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAULTS
    except (RepaEFastError, FileNotFoundError) as error:
        # Configuration, data, checkpoint and run-folder errors name the file in the message.
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
