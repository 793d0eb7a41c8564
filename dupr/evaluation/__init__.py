"""Downstream evaluations of pre-trained backbones (paper §4): detection fine-tuning with COCO
and PASCAL VOC metrics, spatial sensitivity (§4.6.1), patch correspondence (§4.6.2) and the
per-level linear probe (Table VI b). Pure PyTorch, like the rest of `dupr`."""
