"""Engine-neutral extraction: the compiled forward pass with on-device reductions, and the batch loop (load ahead, run, write behind) both engines use."""
