"""The TOPR pipeline (``topr_pipeline.py``) and how to run it locally or compile it (``runner.py``)."""
