"""Evaluation of frozen features, one module per protocol on one shared front end:

- ``inputs``: what an evaluation reads (a checkpoint / init / pixels network and its datasets, from one
  ``EvalRequest``); ``api.evaluate_checkpoint`` runs any protocol on it;
- ``knn`` (DINO's weighted k-NN, on the ``knn_search`` engine), ``linear`` (linear probes), ``zeroshot``
  (CLIP), ``slots`` (SPARO slot subsets, per-slot accuracy, greedy selection);
- ``feature_kinds`` (what is read from a network) and ``feature_store`` (extraction to memory-mapped
  stores, the content-keyed cache);
- ``periodic``: evaluation during training (k-NN, CLIP's zero-shot) behind one due / evaluate protocol.
"""
