"""The site configuration: the schema, the rules it shares with the client commands, and
rendering its problems.
"""
