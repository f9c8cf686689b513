# The paper's COCO set-up (Yan et al., ICLR 2020, Sec. 5.2) as a detectron2 LazyConfig: Mask
# R-CNN R50-FPN trained from scratch, MABN in the ResNet, the FPN, a 4conv-1fc box head and the
# mask head, weight centralization of every conv that feeds MABN, 16 images per iteration (2
# per GPU on 8 GPUs), the 2x schedule. The same model and schedule as
# configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml (tests/integration/test_build_paths.py checks
# the model).
# Built on detectron2's model-zoo LazyConfigs, the way its new_baselines are.
#
#   python tools/lazyconfig_train_net.py --num-gpus 8 \
#       --config-file configs/lazy/mask_rcnn_R_50_FPN_2x_mabn_scratch.py
#
# Reproduces: the paper's Mask R-CNN R50-FPN with MABN from scratch (COCO train2017 ->
# val2017). Expected (the paper's numbers, not measured by mabn_d2): 36.5 box AP / 32.7 mask AP.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from mabn_d2 import MABNSettings

# MABN's settings, one node for every MABN layer (each part's norm is "${mabn}"), the paper's
# values spelled out; `mabn.buffer_size=8` on the command line changes them all.
mabn = L(MABNSettings)(
    eps=1e-5,
    momentum=0.02,  # weight of the newest value = the paper's history weight 0.98
    buffer_size=16,
    warmup_iters=100,
    renorm_start_iter=1000,
    renorm_clip=5.0,
    backward_moving_average=True,
    centralize_weights=True,
    sync=False,
)

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_2x
train = model_zoo.get_config("common/train.py").train

# fmt: off
model.backbone.bottom_up.stem.norm = \
    model.backbone.bottom_up.stages.norm = \
    model.backbone.norm = \
    model.roi_heads.box_head.conv_norm = \
    model.roi_heads.mask_head.conv_norm = "${mabn}"
# fmt: on
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.backbone.bottom_up.freeze_at = 0  # nothing pretrained to freeze
# 4conv-1fc box head
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
# From scratch: inputs scaled to unit variance (detectron2's YAML default std is 1, for
# Caffe2 weights).
model.pixel_std = [57.375, 57.120, 58.395]

train.init_checkpoint = ""
train.max_iter = 180000  # 2x at 16 images per iteration; lr_multiplier_2x scales with it
train.eval_period = 0  # evaluate after the last iteration (as the YAML configs)
# MABN calibration when fine-tuning from BN checkpoints (MODEL.MABN.CALIBRATION in YAML; only
# layers converted from a checkpoint without statistics are calibrated, so none here).
train.mabn_calibration = dict(mode="auto", num_batches=20, backward=True)
# PreciseBN (TEST.PRECISE_BN in YAML): recompute BN and MABN running statistics after training.
train.precise_bn = dict(enabled=False, num_iter=200)
