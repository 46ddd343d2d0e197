"""Stage `steer`: edit SAE latents inside the running model (scale, add, set, push along a feature's
direction) and generate with the edit. The entry point is :func:`pipeline.steer.stage.run`."""
