"""What the daemon and its node agents say to each other: the framing of a JSON-lines call and
one typed message per call, shared by both sides.
"""
