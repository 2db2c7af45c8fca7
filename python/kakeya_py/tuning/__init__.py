"""``kakeya tune``: a per-(layer, stream) policy searched on a ladder of settings.

``search`` holds the ladder of settings (``Ladder``, ``LadderCodec``), the greedy search under
a quality budget on fit passages, the selection on validation passages, the winner as a
policy (``state_policy``, ``state_peer_policy``) and the ``kakeya tune`` command and report.
"""
