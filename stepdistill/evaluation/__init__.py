"""Evaluation: FID on any feature module (`fid`), CLIP score (`clip`), the COCO presets (`coco`), distances to a
known mixture (`distribution`), sampling speed (`sampling_speed`), the miniature worlds' metrics (`miniature`,
with `evaluate_student`), the loader choice for pipeline folders (`loading`) and `stepdistill eval` (`command`)."""
