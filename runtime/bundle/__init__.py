"""The bundle format: manifest schema, file and tensor names.

The one contract that export writes and the runtime reads.
"""
