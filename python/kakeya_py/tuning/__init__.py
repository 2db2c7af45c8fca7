"""Tuning: a per-(layer, stream) policy searched on a ladder of settings (``kakeya tune``).

``ladder`` is the search space (``Ladder``: the rungs per stream, kakeya configs or peer
specs; ``LadderCodec``: their round trips, each once per tensor; ``reusing_runner``), ``search``
the greedy search under a quality budget on fit passages, the selection on validation
passages and the winner as a policy (``search``, ``state_policy``), ``report`` the Markdown
and figure of a ``tune.json`` record. The command is :mod:`kakeya_py.cli.tune`. The public
names are re-exported here (``from kakeya_py.tuning import Ladder, search``).
"""

from .ladder import DEFAULT_CACHE_BYTES, DEFAULT_LADDER, Ladder, LadderCodec, artifact_ref, reusing_runner
from .report import plot_path, tune_markdown
from .search import (
    COSTS,
    TuneResult,
    TuneSettings,
    basis_provenance,
    greedy_path,
    measure,
    passes,
    replay,
    save_preset,
    search,
    select_on_validation,
    split_passages,
    state_peer_policy,
    state_policy,
)

__all__ = [
    "COSTS",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_LADDER",
    "Ladder",
    "LadderCodec",
    "TuneResult",
    "TuneSettings",
    "artifact_ref",
    "basis_provenance",
    "greedy_path",
    "measure",
    "passes",
    "plot_path",
    "replay",
    "reusing_runner",
    "save_preset",
    "search",
    "select_on_validation",
    "split_passages",
    "state_peer_policy",
    "state_policy",
    "tune_markdown",
]
