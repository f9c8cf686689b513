"""Zero-cost deployment: fold eval-mode MABN into the convs (``fuse``) and trace the result
with detectron2's export path (``trace``)."""
