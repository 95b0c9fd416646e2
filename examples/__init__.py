"""Examples built on transactional-outbox: the orders demo, and a FastAPI variant."""
