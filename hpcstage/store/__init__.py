"""Object stores behind one protocol: S3 (aiobotocore plus the fast GET paths) and a plain
filesystem, multipart parts, checksums, and the recycle-bin rules of a safe write.
"""
