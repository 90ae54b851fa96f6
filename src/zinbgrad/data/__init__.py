"""Data access: AnnData / sparse / backed inputs, validation, block readers."""
