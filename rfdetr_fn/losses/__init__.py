"""Hungarian matching, the set criterion, and `objective.loss` (exported as `rf.loss`), the one training loss.

Kept import-free: the data loader reads TARGET_KEYS from here without loading the model.
"""

TARGET_KEYS = ("labels", "boxes", "masks", "keypoints")  # the batch entries the criterion reads as targets
