"""Routing: the router, token-to-expert assignment with capacity, and the auxiliary losses."""
