"""rbees-orcd: the thin router in front of the workers."""
