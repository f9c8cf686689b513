# Reproduces: nothing; the CPU-sized smoke configuration of the LazyConfig tool's tests
# (tests/e2e/test_lazyconfig_train_net.py), configs/tiny/mask_rcnn_R_18_FPN_tiny_mabn_coco.yaml as a
# LazyConfig: the demo's Mask R-CNN R-18-FPN with MABN everywhere on detectron2's builtin COCO
# 2017 names (point DETECTRON2_DATASETS at a COCO root, e.g. the 159-image
# ../shared/data/coco_mini), 160-px images, 2 images per batch, a constant learning rate. MABN
# settings small enough that a few iterations pass through batch statistics, moving averages
# and renorm.
# Expected: after a few iterations, AP near 0; the run checks the machinery, not accuracy.
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import MultiStepParamScheduler

from mabn_d2 import MABNSettings

from ..demo.mask_rcnn_R_18_FPN_demo_mabn import dataloader, model, optimizer, train

mabn = L(MABNSettings)(buffer_size=4, warmup_iters=2, renorm_start_iter=4)

model.proposal_generator.anchor_generator.sizes = [[32], [64], [128], [256], [512]]
model.proposal_generator.post_nms_topk = (500, 100)
model.roi_heads.num_classes = 80
# An untrained model's scores are below detectron2's 0.05.
model.roi_heads.box_predictor.test_score_thresh = 0.0
model.roi_heads.box_predictor.test_topk_per_image = 10

dataloader.train.dataset.names = "coco_2017_train"
_train_resize = dataloader.train.mapper.augmentations[0]  # the demo's ResizeShortestEdge
_train_resize.short_edge_length, _train_resize.max_size = (160,), 256
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "coco_2017_val"
_test_resize = dataloader.test.mapper.augmentations[0]
_test_resize.short_edge_length, _test_resize.max_size = 160, 256
dataloader.test.num_workers = 0

optimizer.lr = 0.01
# Constant (detectron2 v0.6's LR hook also evaluates the schedule after the last iteration,
# which its ConstantParamScheduler refuses).
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0], milestones=[], num_updates=4)
train.max_iter = 4
train.checkpointer.period = 2
train.log_period = 1
train.output_dir = "output/lazy_tiny"
