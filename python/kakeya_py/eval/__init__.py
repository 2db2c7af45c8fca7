"""The quality harness: how a codec is measured on a model, never how it codes.

``hooks`` intercepts K and V at every attention layer (``KVInterceptor``, a context
manager), ``harness`` runs the codec-off reference and the variants on the same passages
(``HFRunner``, ``Variant``, the codec / noise transforms), ``metrics`` turns their logits into
Δppl, top-1 agreement, KL and the verdict, ``corpus`` provides the text (WikiText-2 in
calibration / validation / test parts, the code text, passages) and ``report`` writes the
Markdown. The modules are the API (``from kakeya_py.eval.harness import HFRunner``); torch
and transformers are imported inside the functions that need them.
"""
