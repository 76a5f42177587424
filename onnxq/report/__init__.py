"""What onnxq tells its user: the CLI summary, the ``--report`` files and chart, ``onnxq inspect``'s table."""
