"""Object stores behind one protocol (protocol.py): S3 (s3.py, over s3_bucket.py's client and
s3_download.py's strategies, with the lean GETs of lean.py and ranged.py in front of the SDK) and
a shared filesystem (fs.py); transfers in parts (parts.py) and their checks (verify.py,
checksums.py); and the recycle-bin rules of a safe write (recycle.py).
"""
