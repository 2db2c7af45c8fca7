"""Offline calibration: the per-model artifacts a policy can use, fitted on the calibration
part of the corpus only.

``core`` fits and loads the Σ_q pre-conditioning factors and the Lloyd–Max centroid tables
(``run_sigma_q`` / ``load_sigma_q_artifact``, ``run_centroids`` / ``load_centroids``,
``calibrated_policy``) and holds the checks every artifact shares (version, model identity,
text disjoint from evaluation text, sidecar reading); ``model_basis`` fits and loads the
per-model coefficient basis (``fit_basis``, ``save_basis``, ``load_basis``). The command
line is ``kakeya calibrate`` (:mod:`kakeya_py.cli.calibration`).
"""
