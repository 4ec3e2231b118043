"""Few-shot drawing data: Omniglot and QuickDraw-FS builders, the stroke rasteriser, exemplar/variation batches."""
