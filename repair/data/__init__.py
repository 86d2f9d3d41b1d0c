"""Images in: folders and labels (folders.py), features and their cache (features.py), process groups (group.py)."""
