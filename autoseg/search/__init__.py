"""Hyperparameter search over what the planning rules cannot decide; Optuna is imported nowhere else.

``search(RUN, trials=12)`` (``autoseg search RUN --trials 12``) runs an Optuna study whose first trial is the rule
plan: each trial trains fold 0 of a sampled plan at a reduced budget in ``RUN/search/<study>/trial_<n>/``, a
pruner stops poor trials after a few epochs, and the best plan is written back into ``RUN/plans.json`` (with its
provenance in ``plans.search``; the rule plan is kept in ``RUN/search/rule_plans.json``). ``RUN/search/history.png``
and ``importances.png`` show the optimisation. Running it again resumes; ``storage="postgresql://..."`` shares one
study between workers on several machines.

Modules: :mod:`~autoseg.search.space` (the space as data, ``suggest(trial, plans) -> Plans``),
:mod:`~autoseg.search.objective` (one trial), :mod:`~autoseg.search.storage` (storages, counting, dead workers),
:mod:`~autoseg.search.study` (the study and the write-back), :mod:`~autoseg.search.plots`.
"""

from autoseg.search.space import suggest
from autoseg.search.study import SearchResult, search

__all__ = ["search", "suggest", "SearchResult"]
