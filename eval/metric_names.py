"""The names of the evaluation metrics (a module of its own, so the command-line parser can list them without
importing the feature networks)."""

METRICS = ("fid", "kid", "precision", "recall", "fd_digits", "accuracy", "precision_digits", "recall_digits",
           "grain", "clip")
