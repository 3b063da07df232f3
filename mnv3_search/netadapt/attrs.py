"""The names under which a run's study and its trials keep their records: what the master, the workers and
the proposal ledger agree on. They are a file format (a resumed run reads the names an earlier one wrote, a
worker of one machine those of another), so each is spelled once, here, and never changed.
"""

from __future__ import annotations

# -- trial params: what a proposal's trials are enqueued with (fixed, never sampled) -----------------------
GROUP_PARAM = "group"  # the proposal group a one-group proposal shrinks (also the proposal's name)
CHANNELS_PARAM = "channels"  # the channels it keeps (one-group proposals only)
FIXED_PARAMS_ATTR = "fixed_params"  # Optuna's system attr holding an enqueued trial's params while WAITING
# Optuna's system attr (study or trial) per uploaded artifact, "artifacts:<id>" -> its file name and type
# (optuna.artifacts' own prefix; optuna-dashboard lists them): written before the bytes (artifacts.py)
ARTIFACT_RECORD_PREFIX = "artifacts:"

# -- study user attrs: the run a worker joins -------------------------------------------------------------
CONFIG_ATTR = "netadapt_config"
RUN_DIR_ATTR = "run_dir"
STATUS_ATTR = "status"  # running | finished
GROUPS_ATTR = "groups"  # [group names, widest channel count] of the seed: the trials' param space
ARTIFACTS_ATTR = "artifact_store"  # where this run's checkpoints travel (no secret in it)
PARENT_PREFIX = "artifact:"  # per parent network: "artifact:seed.pt" -> artifact id (None: removed)

# -- trial user attrs: claims and retries (study.py) ------------------------------------------------------
ITERATION_ATTR = "iteration"
RUNG_ATTR = "rung"  # successive-halving rung of a proposal's trial (0: from the parent)
HEARTBEAT_ATTR = "heartbeat"
WORKER_ATTR = "worker"  # host:pid of the process that claimed it
ATTEMPT_ATTR = "attempt"  # 1 for a proposal's first evaluation, +1 each time it is enqueued again
FAILURE_ATTR = "failure"  # why an attempt failed (its worker died or went silent)
GIVEN_UP_ATTR = "given_up"  # True on a proposal's last allowed attempt once it failed: never enqueued again
RETRY_OF_ATTR = "retry_of"  # the failed trial a retry replaces

# -- trial user attrs: the proposal, set by the master when it enqueues it ----------------------------------
PARENT_ATTR = "parent"  # the parent network's checkpoint, relative to the run folder
KIND_ATTR = "kind"  # the group's kind (expansion, coupled outputs, ...)
CHANNELS_BEFORE_ATTR = "channels_before"
# a proposal of several cuts (--method hybrid's knapsack): {group: channels kept}; its GROUP_PARAM is its name
# and it has no CHANNELS_PARAM
CUTS_ATTR = "cuts"
PREDICTED_LATENCY_ATTR = "predicted_latency_ms"  # the table's figure (latency budgets only, else None)
MACS_ATTR = "macs"
PARAMS_ATTR = "params"
RESOURCE_ATTR = "resource"  # the child's figure in the budget's unit
PARENT_RESOURCE_ATTR = "parent_resource"
PARENT_ACCURACY_ATTR = "parent_accuracy"
TIE_TOLERANCE_ATTR = "tie_tolerance"
LAST_RUNG_ATTR = "last_rung"  # the index of the iteration's last rung: reaching it is not being stopped

# -- trial user attrs: one rung's work (evaluate.py) ------------------------------------------------------
START_ATTR = "start_step"
STOP_ATTR = "stop_step"
EVAL_ATTR = "eval_steps"
FROM_ATTR = "resume_from"  # trial number of the previous rung (its checkpoint), None on rung 0
METRICS_ATTR = "metrics"  # [[step, holdout accuracy, holdout loss], ...] at each eval step
ACCURACY_ATTR = "holdout_accuracy"  # at the rung's last eval step
LOSS_ATTR = "holdout_loss"
STEPS_ATTR = "steps"  # fine-tune steps this trial trained
SECONDS_ATTR = "seconds"
CHECKPOINT_ATTR = "checkpoint_artifact"  # artifact id of the trial's fine-tuned weights
STATE_ATTR = "state_artifact"  # artifact id of its optimizer, data-order and RNG state
