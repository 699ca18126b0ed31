"""`vtc evaluate`'s parts; train/evaluate.py runs them."""
