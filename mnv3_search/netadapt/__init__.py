"""NetAdapt guided and recorded by Optuna: config, run folder, study, proposal evaluation, the loop."""

from .config import RunConfig
from .loop import BudgetUnreachable, NetAdapt, RunResult, run_netadapt

__all__ = ["BudgetUnreachable", "NetAdapt", "RunConfig", "RunResult", "run_netadapt"]
