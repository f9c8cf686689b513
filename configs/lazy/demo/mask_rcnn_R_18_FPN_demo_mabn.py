# The README's demo as a detectron2 LazyConfig: configs/demo/mask_rcnn_R_18_FPN_demo_mabn.yaml
# (with its base configs/demo/Base-Demo-RCNN-FPN.yaml), same model, data and schedule. Mask
# R-CNN R-18-FPN (FPN width 64, 4conv-1fc box head and mask head of width 64) with MABN in the
# ResNet, the FPN, the box and the mask head, trained from scratch on the embedded procedural
# shapes (128x128 images, 4 categories; written under ./datasets on first use) for 600
# iterations of 4 images on the CPU, then COCO-evaluated (box and mask AP) on the held-out split.
#
#   python tools/lazyconfig_train_net.py \
#       --config-file configs/lazy/demo/mask_rcnn_R_18_FPN_demo_mabn.py
#
# tests/integration/test_build_paths.py checks that the model equals the YAML demo's.
# One difference: the YAML demo clips each parameter's gradient (SOLVER.CLIP_GRADIENTS), which
# detectron2's LazyConfig optimizer has no key for; without it a seed can land well below the
# YAML demo's range (docs/training.md). Not measured separately with this file.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

import mabn_d2.data  # noqa: F401  (registers mabn_demo_shapes_train / _val)
from mabn_d2 import MABNSettings

from ..mask_rcnn_R_50_FPN_2x_mabn_scratch import dataloader, model, optimizer, train

# The paper's settings except the buffer: a 600-iteration high-LR schedule changes the weights
# quickly, so 4 iterations of statistics instead of 16 (see the YAML demo and docs/training.md).
mabn = L(MABNSettings)(
    buffer_size=4,  # paper: 16 (for 180k iterations)
    warmup_iters=100,
    renorm_start_iter=1000,  # batch renormalisation never starts in 600 iterations
    momentum=0.02,
)

# ResNet-18: basic blocks (no 1x1 convs, hence no stride_in_1x1), widths 64 ... 512.
_bottom_up = model.backbone.bottom_up
_bottom_up.stages.depth = 18
del _bottom_up.stages.stride_in_1x1
model.backbone.out_channels = 64

_rpn = model.proposal_generator
_rpn.head.in_channels = 64
_rpn.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
_rpn.pre_nms_topk = (500, 500)  # (training, test), per FPN level
_rpn.post_nms_topk = (250, 250)

_roi_heads = model.roi_heads
_roi_heads.num_classes = 4
_roi_heads.batch_size_per_image = 64
_roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
_roi_heads.box_head.conv_dims = [64, 64, 64, 64]
_roi_heads.box_head.fc_dims = [256]
_roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
_roi_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
_roi_heads.mask_head.conv_dims = [64, 64, 64, 64, 64]  # 4 convs + the deconv

dataloader.train.dataset.names = "mabn_demo_shapes_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=128, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "mabn_demo_shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128),
]
dataloader.test.num_workers = 1

optimizer.lr = 0.02
train.max_iter = 600
# LR x0.1 at iteration 450, linear warm-up over the first 50 (SOLVER.STEPS, WARMUP_ITERS),
# as fractions of train.max_iter (another max_iter scales them).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[450], num_updates=600),
    warmup_length=50 / 600,
    warmup_factor=0.001,
)
train.checkpointer.period = 300
train.device = "cpu"
train.seed = 0
train.output_dir = "output/lazy_demo"
