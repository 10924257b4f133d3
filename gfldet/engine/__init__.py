"""Training/evaluation engine: COCO evaluation and checkpoint I/O."""
