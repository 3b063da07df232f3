"""NetAdapt guided and recorded by Optuna.

A run (runner.py) opens a session (session.py: run folder, study, latency table, seed) and drives the shape
search its config names: NetAdapt's iterations (iterative.py: proposals.py -> halving.py -> selection.py,
recorded by ledger.py) or the one-shot knapsack (knapsack_search.py); both confirm a latency budget by timing
the network beside the seed (confirm.py). Then the final training; the result is one record (runfolder.py).
Workers (worker.py, evaluate.py) fine-tune proposals claimed from the study (study.py, attrs.py, artifacts.py).
"""

from .config import RunConfig
from .pricing import BudgetUnreachable
from .runfolder import RunResult
from .runner import NetAdapt, run_netadapt

__all__ = ["BudgetUnreachable", "NetAdapt", "RunConfig", "RunResult", "run_netadapt"]
