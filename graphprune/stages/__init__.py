"""The pruning pipeline, one module per stage.

    load → trace → score → plan → compensate → rewrite → verify → recover → write

Each stage is a function (or a small class) over plain values, so ``graphprune.pipeline.prune``
reads as the list of stages and alternatives plug in beside them instead of inside ``prune``:

=================  ==========================================================================
``load``           load, validate and trace a model at its input size (``load_and_trace``);
                   the signature checks every stage's output must pass
``score``          what a criterion needs, the calibration statistics, the scores (``score``)
``plan``           how a round turns scores into a pruned model: ``ChannelRound`` (a budget of
                   MACs/params/channels) or ``LatencyRound`` (measured latency), both returning
                   a ``RoundResult``
``compensate``     weight compensation into the trace graph (undoable)
``rewrite``        the pruned ONNX model for a removal, checked by onnx.checker and signature
``verify``         parity against the masked original, and the structural check a report allows
``accuracy``       top-1 accuracy on labelled data (--eval), before and after
``recover``        distillation from the dense model (graphprune/recover.py does the training)
``report``         the report's group table and totals
``write``          the model and its report, atomically, on rank 0
``eigendamage``    the layer-rewriting alternative to channel rounds (``EigenDamageMethod``)
=================  ==========================================================================
"""
