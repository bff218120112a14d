"""The Optuna search: study files, the search space, the objective, the pruner, storages, workers.

This is the only package that imports optuna.
"""

from microsearch.search.dashboard import serve_dashboard
from microsearch.search.pareto import save_pareto, trial_points
from microsearch.search.pruner import TargetPruner, is_feasible
from microsearch.search.report import write_report
from microsearch.search.retrain import retrain
from microsearch.search.run import best_feasible, load_existing, open_study, run_worker, summary
from microsearch.search.space import TrialPlan, starting_points, suggest
from microsearch.search.storage import StorageError, open_storage
from microsearch.search.study import StudyConfig, StudyError, load_study
from microsearch.search.workers import launch

__all__ = [
    "StorageError",
    "StudyConfig",
    "StudyError",
    "TargetPruner",
    "TrialPlan",
    "best_feasible",
    "is_feasible",
    "launch",
    "load_existing",
    "load_study",
    "open_storage",
    "open_study",
    "retrain",
    "run_worker",
    "save_pareto",
    "serve_dashboard",
    "starting_points",
    "suggest",
    "summary",
    "trial_points",
    "write_report",
]
