"""Reports as text: the eval table in every rendering, and the model card."""
