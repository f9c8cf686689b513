"""MABN in detectron2: the norm name ``"MABN"``, the YAML config node, weight-centralized
convs, the batch-statistics recorder, and the one module that patches detectron2
(:mod:`mabn_d2.integration.patch`)."""
