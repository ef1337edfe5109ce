"""What the fit loop runs around the pure step: upstream's callbacks as pure functions (`trackers`), the
batch-size probe (`autobatch`), whole-step CUDA graphs (`graphs`) and the printed summary (`summary`)."""
