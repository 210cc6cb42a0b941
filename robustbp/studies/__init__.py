"""The papers' studies: a kill-safe result store and the statistics of their reports (the study
definitions, runner and reports are still to come, see the README)."""
from robustbp.studies.statistics import RankSum, rank_sum, summary
from robustbp.studies.store import ResultStore, StoreLocked

__all__ = ["RankSum", "ResultStore", "StoreLocked", "rank_sum", "summary"]
